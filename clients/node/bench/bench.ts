// Throughput of Baileys' Signal code over three stores: in memory, useMultiFileAuthState,
// and baileys-store (real nats-server and service, started here). Not a test: it prints figures.
//
//   npm run bench                   # about 8 s per store and workload
//   BENCH_SECONDS=3 npm run bench   # shorter
import { performance } from 'node:perf_hooks'
import type { NatsConnection } from 'nats'
import { findServiceBinary, NatsServer, removeDir, Service, tempDir } from '../test/support/servers.js'
import { type OpenAuth, World } from '../test/support/signal-world.js'
import { fileStore, memoryStore, natsStore } from '../test/support/stores.js'

const seconds = Number(process.env.BENCH_SECONDS ?? 8)

interface Row {
	store: string
	workload: string
	sent: number
	decrypted: number
	wallS: number
	nodeCpuS: number
	/** CPU of the processes behind the store (service and nats-server), when there are any. */
	storeCpuS?: { service: number; nats: number }
	requests?: number
}

type Workload = 'direct' | 'group'

async function measure(store: string, open: OpenAuth, storeCpu?: () => { service: number; nats: number }, requests?: () => number): Promise<Row[]> {
	const world = new World(open)
	await world.setup()
	// One warm-up round: first sessions and sender keys are set up outside the timed part.
	await world.directRound(0)
	await world.groupRound(0)
	const rows: Row[] = []
	let round = 1
	for (const workload of ['direct', 'group'] as Workload[]) {
		const [sent0, decrypted0, req0] = [world.sent, world.delivered, requests?.() ?? 0]
		const cpu0 = process.cpuUsage()
		const store0 = storeCpu?.()
		const t0 = performance.now()
		while (performance.now() - t0 < seconds * 1000) {
			await (workload === 'direct' ? world.directRound(round) : world.groupRound(round))
			round++
		}
		const wallS = (performance.now() - t0) / 1000
		const cpu = process.cpuUsage(cpu0)
		const store1 = storeCpu?.()
		rows.push({
			store,
			workload,
			sent: world.sent - sent0,
			decrypted: world.delivered - decrypted0,
			wallS,
			nodeCpuS: (cpu.user + cpu.system) / 1e6,
			storeCpuS: store0 && store1 ? { service: store1.service - store0.service, nats: store1.nats - store0.nats } : undefined,
			requests: requests ? requests() - req0 : undefined
		})
	}
	if (world.failures.length) throw new Error(`${store}: ${world.failures.length} decrypt failures, e.g. ${world.failures[0]}`)
	return rows
}

function print(rows: Row[]): void {
	const fmt = (n: number, d = 0) => n.toFixed(d)
	console.log(`\n${seconds} s per store and workload; 4 devices of 3 accounts in one Node process.`)
	console.log('sent/s: messages encrypted and sent; dec/s: messages decrypted by a recipient device.')
	console.log('per CPU-s: decrypted messages per CPU-second, of the Node process, then of Node + service + nats-server.\n')
	console.log(
		['store', 'workload', 'sent/s', 'dec/s', 'node CPU%', 'dec/nodeCPU-s', 'svc CPU%', 'nats CPU%', 'dec/allCPU-s', 'req/sent'].map((h, i) => (i < 2 ? h.padEnd(14) : h.padStart(15))).join('')
	)
	for (const r of rows) {
		const storeCpu = r.storeCpuS ? r.storeCpuS.service + r.storeCpuS.nats : 0
		console.log(
			[
				r.store.padEnd(14),
				r.workload.padEnd(14),
				fmt(r.sent / r.wallS, 1),
				fmt(r.decrypted / r.wallS, 1),
				fmt((100 * r.nodeCpuS) / r.wallS),
				fmt(r.decrypted / r.nodeCpuS, 1),
				r.storeCpuS ? fmt((100 * r.storeCpuS.service) / r.wallS) : '-',
				r.storeCpuS ? fmt((100 * r.storeCpuS.nats) / r.wallS) : '-',
				fmt(r.decrypted / (r.nodeCpuS + storeCpu), 1),
				r.requests !== undefined ? fmt(r.requests / r.sent, 1) : '-'
			]
				.map((c, i) => (i < 2 ? c : c.padStart(15)))
				.join('')
		)
	}
}

const rows: Row[] = []
rows.push(...(await measure('memory', memoryStore())))

const dir = tempDir('bstore-bench-files-')
try {
	rows.push(...(await measure('multi-file', fileStore(dir))))
} finally {
	removeDir(dir)
}

const bin = findServiceBinary()
if (!bin) {
	console.log('baileys-store binary not found (target/ci, target/debug or BSTORE_BIN): skipping it')
} else {
	const nats = await NatsServer.start()
	let nc: NatsConnection | undefined
	const service = new Service(bin, nats.url)
	try {
		nc = await nats.connect()
		await service.start(nc)
		const conn = nc
		console.log(`baileys-store: ${bin}`)
		rows.push(
			...(await measure(
				'baileys-store',
				natsStore(conn, { tenant: 'bench' }),
				() => ({ service: service.cpuSeconds(), nats: nats.cpuSeconds() }),
				() => conn.stats().outMsgs
			))
		)
	} finally {
		await nc?.close()
		await service.dispose()
		await nats.stop()
	}
}
print(rows)

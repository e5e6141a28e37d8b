// Throughput and CPU cost of Baileys' own Signal code over four auth-state stores, in one run
// on one machine: Baileys' in-memory keys (the ceiling), useMultiFileAuthState, a Redis-direct
// store written as the popular npm packages write it, and baileys-store through this client
// (real nats-server and service processes, started here). Each with and without
// makeCacheableSignalKeyStore. Not a test: it prints figures and asserts nothing but the
// plaintexts.
//
//   npm run bench                                  # one run, about 2.5 minutes
//   BENCH_RUNS=3 npm run bench                     # three runs, then the medians
//   BENCH_SECONDS=2 BENCH_STORES=memory,baileys-store npm run bench
//
// Environment: BENCH_SECONDS (per row, default 4), BENCH_RUNS (default 1), BENCH_STORES
// (memory,multi-file,redis,baileys-store; add bstore-request for the client over nats.js
// request() instead of its reply multiplexer, as it was before issue 13, and nats-echo for
// values in memory plus this client's round trip to a responder that answers at once, see
// echo-store.ts), BENCH_WORKLOADS
// (1:1,group,multi-device), BENCH_CACHE (both|on|off), REDIS_URL (use a running
// Redis instead of starting redis-server; its CPU is then not counted), REDIS_SERVER_BIN,
// BSTORE_BIN (default target/release/baileys-store, then target/ci, target/debug),
// BENCH_PROJECT_REDIS=1 (give the service BSTORE_REDIS_URL: the Redis projection on), BENCH_CLAIM=0
// (the baileys-store client without its writer claim: every read a request, as before).
import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import type { SignalKeyStore } from '@whiskeysockets/baileys'
import { Redis } from 'ioredis'
import type { NatsConnection } from 'nats'
import type { NatsAuthState } from '../src/index.js'
import { findServiceBinary, NatsServer, procCpuSeconds, removeDir, repoDir, Service, tempDir } from '../test/support/servers.js'
import type { OpenAuth } from '../test/support/signal-world.js'
import { fileStore, memoryStore, natsStore } from '../test/support/stores.js'
import { echoStore, startEchoResponder } from './echo-store.js'
import { redisStore } from './redis-store.js'
import { accounts, BenchWorld } from './world.js'

const seconds = Number(process.env.BENCH_SECONDS ?? 4)
const runs = Number(process.env.BENCH_RUNS ?? 1)
const storeNames = (process.env.BENCH_STORES ?? 'memory,multi-file,redis,baileys-store').split(',').map((s) => s.trim())
const cacheModes = { both: [true, false], on: [true], off: [false] }[process.env.BENCH_CACHE ?? 'both'] ?? [true, false]

type Workload = '1:1' | 'group' | 'multi-device'
const WORKLOADS: { name: Workload; what: string }[] = [
	{ name: '1:1' as const, what: '4 accounts x 1 device, every device to every other account' },
	{ name: 'group' as const, what: '4 accounts x 1 device, one group, every device sends' },
	{ name: 'multi-device' as const, what: '3 accounts x 2 devices, 1:1 to each other account (fan-out to 3 devices)' }
].filter((w) => !process.env.BENCH_WORKLOADS || process.env.BENCH_WORKLOADS.split(',').includes(w.name))

/** A process whose CPU counts as part of the system under test. */
interface Proc {
	name: string
	cpuSeconds: () => number
}

interface Row {
	run: number
	store: string
	cached: boolean
	workload: Workload
	sent: number
	decrypted: number
	wallS: number
	/** CPU seconds by process over the row: node first. */
	cpu: Record<string, number>
	storeGets: number
	storeSets: number
	/** Requests the client sent to the service (baileys-store rows only). */
	requests?: number
}

interface StoreUnderTest {
	name: string
	/** A fresh OpenAuth whose sessions share nothing with any other call's. */
	open: (label: string) => OpenAuth
	procs: Proc[]
	/** Requests sent to the service so far, where the store can tell. */
	requests?: () => number
}

/** Counts the calls that reach the store (below makeCacheableSignalKeyStore, if any). */
function counted(open: OpenAuth, counts: { gets: number; sets: number }): OpenAuth {
	return async (device) => {
		const handle = await open(device)
		const { creds, keys } = handle.state
		const wrapped: SignalKeyStore = {
			get: (type, ids) => {
				counts.gets++
				return keys.get(type, ids)
			},
			set: (data) => {
				counts.sets++
				return keys.set(data)
			}
		}
		return { state: { creds, keys: wrapped }, saveCreds: handle.saveCreds }
	}
}

const nodeProc: Proc = { name: 'node', cpuSeconds: () => procCpuSeconds(process.pid) }

/**
 * One store in one run: two worlds set up once (812 pre-keys per device), measured with the
 * cache modes in turn; between modes every device is reopened from the store, as a restarted
 * bot would be.
 */
async function measureStore(run: number, store: StoreUnderTest): Promise<Row[]> {
	const counts = { gets: 0, sets: 0 }
	const open = counted(store.open(`r${run}`), counts)
	const small = new BenchWorld(open, accounts(run * 10 + 1, 4, 1), run * 10 + 1)
	const multi = new BenchWorld(open, accounts(run * 10 + 2, 3, 2), run * 10 + 2)
	const procs = [nodeProc, ...store.procs]
	const rows: Row[] = []
	for (const [i, cached] of cacheModes.entries()) {
		const t0 = performance.now()
		if (i === 0) {
			await small.setup(cached)
			await multi.setup(cached)
		} else {
			await small.reopen(cached)
			await multi.reopen(cached)
		}
		// One warm-up round each: sessions and sender keys exist, and caches are filled, before timing.
		await small.directRound(0)
		await small.groupRound(0)
		await multi.directRound(0)
		const setupS = (performance.now() - t0) / 1000
		for (const { name: workload } of WORKLOADS) {
			const world = workload === 'multi-device' ? multi : small
			const step = workload === 'group' ? (r: number) => world.groupRound(r) : (r: number) => world.directRound(r)
			const [sent0, dec0, gets0, sets0] = [world.sent, world.delivered, counts.gets, counts.sets]
			const req0 = store.requests?.()
			const cpu0 = procs.map((p) => p.cpuSeconds())
			const start = performance.now()
			let round = 1
			while (performance.now() - start < seconds * 1000) await step(round++)
			const wallS = (performance.now() - start) / 1000
			const cpu1 = procs.map((p) => p.cpuSeconds())
			rows.push({
				run,
				store: store.name,
				cached,
				workload,
				sent: world.sent - sent0,
				decrypted: world.delivered - dec0,
				wallS,
				cpu: Object.fromEntries(procs.map((p, j) => [p.name, cpu1[j]! - cpu0[j]!])),
				storeGets: counts.gets - gets0,
				storeSets: counts.sets - sets0,
				...(store.requests && req0 !== undefined ? { requests: store.requests() - req0 } : {})
			})
		}
		console.error(`  ${store.name} cache=${cached ? 'on' : 'off'}: set-up ${setupS.toFixed(1)} s`)
	}
	for (const world of [small, multi]) {
		if (world.failures.length) throw new Error(`${store.name}: ${world.failures.length} decrypt failures, e.g. ${world.failures[0]}`)
	}
	return rows
}

const allCpu = (r: Row) => Object.values(r.cpu).reduce((a, b) => a + b, 0)
const key = (r: Pick<Row, 'store' | 'cached' | 'workload'>) => `${r.store}|${r.cached}|${r.workload}`

function median(xs: number[]): number {
	const s = [...xs].sort((a, b) => a - b)
	const m = s.length >> 1
	return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

/** decrypted per CPU-s of the whole system, divided by the in-memory row of the same run, cache mode and workload. */
function ratioToMemory(rows: Row[], r: Row): number | undefined {
	const mem = rows.find((m) => m.run === r.run && m.store === 'memory' && m.cached === r.cached && m.workload === r.workload)
	if (!mem) return undefined
	return r.decrypted / allCpu(r) / (mem.decrypted / allCpu(mem))
}

function printTable(title: string, rows: Row[], all: Row[]): void {
	const groups = new Map<string, Row[]>()
	const order = (r: Row) => [r.cached ? 0 : 1, WORKLOADS.findIndex((w) => w.name === r.workload), storeNames.indexOf(r.store)]
	const sorted = [...rows].sort((a, b) => {
		const [x, y] = [order(a), order(b)]
		return x[0]! - y[0]! || x[1]! - y[1]! || x[2]! - y[2]!
	})
	for (const r of sorted) groups.set(key(r), [...(groups.get(key(r)) ?? []), r])
	console.log(`\n${title}`)
	const head = ['store', 'cache', 'workload', 'msg/s', 'dec/s', 'dec/CPU-s', 'vs memory', 'node CPU%', 'others CPU%', 'gets/msg', 'sets/msg', 'req/msg']
	const widths = [14, 6, 13, 9, 9, 10, 10, 10, 22, 9, 9, 8]
	console.log(head.map((h, i) => (i < 3 ? h.padEnd(widths[i]!) : h.padStart(widths[i]!))).join(' '))
	for (const group of groups.values()) {
		const r0 = group[0]!
		const med = (f: (r: Row) => number) => median(group.map(f))
		const ratios = group.map((r) => ratioToMemory(all, r)).filter((x): x is number => x !== undefined)
		const others = Object.keys(r0.cpu)
			.filter((p) => p !== 'node')
			.map((p) => `${p} ${med((r) => (100 * r.cpu[p]!) / r.wallS).toFixed(0)}`)
			.join(', ')
		const cells = [
			r0.store,
			r0.cached ? 'on' : 'off',
			r0.workload,
			med((r) => r.sent / r.wallS).toFixed(1),
			med((r) => r.decrypted / r.wallS).toFixed(1),
			med((r) => r.decrypted / allCpu(r)).toFixed(1),
			ratios.length ? `${(100 * median(ratios)).toFixed(0)} %` : '-',
			med((r) => (100 * r.cpu.node!) / r.wallS).toFixed(0),
			others || '-',
			med((r) => r.storeGets / r.sent).toFixed(2),
			med((r) => r.storeSets / r.sent).toFixed(2),
			r0.requests === undefined ? '-' : med((r) => (r.requests ?? 0) / r.sent).toFixed(2)
		]
		console.log(cells.map((c, i) => (i < 3 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(' '))
	}
}

async function freePort(): Promise<number> {
	return new Promise((resolve, reject) => {
		const srv = createServer()
		srv.once('error', reject)
		srv.listen(0, '127.0.0.1', () => {
			const port = (srv.address() as { port: number }).port
			srv.close(() => resolve(port))
		})
	})
}

/** A private redis-server on a free loopback port, no persistence. */
async function startRedis(): Promise<{ url: string; child: ChildProcess; dir: string }> {
	const dir = mkdtempSync(join(tmpdir(), 'bstore-bench-redis-'))
	const port = await freePort()
	const bin = process.env.REDIS_SERVER_BIN ?? 'redis-server'
	const child = spawn(bin, ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', 'no'], { stdio: 'ignore' })
	const url = `redis://127.0.0.1:${port}`
	const deadline = Date.now() + 10_000
	for (;;) {
		const probe = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null })
		probe.on('error', () => {}) // not up yet: the loop tries again
		try {
			await probe.connect()
			await probe.ping()
			probe.disconnect()
			return { url, child, dir }
		} catch {
			probe.disconnect()
			if (Date.now() > deadline || child.exitCode !== null) throw new Error(`redis-server (${bin}) did not start`)
			await new Promise((r) => setTimeout(r, 50))
		}
	}
}

function serviceBinary(): string | undefined {
	if (process.env.BSTORE_BIN) return process.env.BSTORE_BIN
	const release = join(repoDir, 'target/release/baileys-store')
	return existsSync(release) ? release : findServiceBinary()
}

const cleanups: (() => Promise<void> | void)[] = []
const stores: StoreUnderTest[] = []
let redisUrl = process.env.REDIS_URL
let redisProcs: Proc[] = []
const wantRedis = storeNames.includes('redis') || (storeNames.some((s) => s === 'baileys-store' || s === 'bstore-request') && process.env.BENCH_PROJECT_REDIS === '1')
if (wantRedis && !redisUrl) {
	const r = await startRedis()
	redisUrl = r.url
	const pid = r.child.pid!
	redisProcs = [{ name: 'redis', cpuSeconds: () => procCpuSeconds(pid) }]
	cleanups.push(() => {
		r.child.kill('SIGTERM')
		rmSync(r.dir, { recursive: true, force: true })
	})
}

/** nats-server and the service, shared by the baileys-store rows of both client paths. */
let bstore: { nc: NatsConnection; procs: Proc[] } | undefined

async function startBstore(bin: string): Promise<{ nc: NatsConnection; procs: Proc[] }> {
	if (process.env.BENCH_PROJECT_REDIS === '1') process.env.BSTORE_REDIS_URL = redisUrl
	const nats = await NatsServer.start()
	cleanups.push(() => nats.stop())
	const nc: NatsConnection = await nats.connect()
	const service = new Service(bin, nats.url)
	cleanups.push(async () => {
		await nc.close()
		await service.dispose()
	})
	await service.start(nc)
	console.error(`baileys-store: ${bin}${process.env.BSTORE_REDIS_URL ? ' (Redis projection on)' : ''}`)
	const procs: Proc[] = [
		{ name: 'service', cpuSeconds: () => service.cpuSeconds() },
		{ name: 'nats', cpuSeconds: () => nats.cpuSeconds() },
		...(process.env.BSTORE_REDIS_URL ? redisProcs : [])
	]
	return { nc, procs }
}

try {
	for (const name of storeNames) {
		if (name === 'memory') stores.push({ name, open: () => memoryStore(), procs: [] })
		else if (name === 'multi-file') {
			const dir = tempDir('bstore-bench-files-')
			cleanups.push(() => removeDir(dir))
			stores.push({ name, open: (label) => fileStore(join(dir, label)), procs: [] })
		} else if (name === 'redis') {
			const redis = new Redis(redisUrl!)
			cleanups.push(() => void redis.disconnect())
			stores.push({ name, open: (label) => redisStore(redis, `bench:${label}`), procs: redisProcs })
		} else if (name === 'nats-echo') {
			const nats = await NatsServer.start()
			cleanups.push(() => nats.stop())
			const nc = await nats.connect()
			const echo = await startEchoResponder(nats.url)
			cleanups.push(async () => {
				await nc.close()
				echo.kill('SIGTERM')
			})
			const pid = echo.pid!
			stores.push({
				name,
				open: (label) => echoStore(nc, label),
				procs: [
					{ name: 'echo', cpuSeconds: () => procCpuSeconds(pid) },
					{ name: 'nats', cpuSeconds: () => nats.cpuSeconds() }
				]
			})
		} else if (name === 'baileys-store' || name === 'bstore-request') {
			const bin = serviceBinary()
			if (!bin) {
				console.log('baileys-store binary not found (BSTORE_BIN, target/release, target/ci or target/debug): skipping it')
				continue
			}
			bstore ??= await startBstore(bin)
			const { nc, procs } = bstore
			// bstore-request: the same client over nats.js request() instead of its reply multiplexer (the client before issue 13).
			const conn = name === 'baileys-store' ? nc : ({ request: nc.request.bind(nc) } as unknown as NatsConnection)
			const opened: NatsAuthState[] = []
			const requests = () => opened.reduce((n, o) => n + (o.claim?.stats.requests ?? 0), 0)
			// BENCH_CLAIM=0: the client without its writer claim (every read goes to the service).
			const claim = process.env.BENCH_CLAIM !== '0'
			stores.push({ name, open: (label) => natsStore(conn, { tenant: `bench-${name}-${label}`, claim }, undefined, opened), procs, ...(claim ? { requests } : {}) })
		} else throw new Error(`unknown store ${name}`)
	}

	const cpuModel = cpus()[0]?.model ?? '?'
	console.log(`# Baileys Signal traffic over four stores`)
	console.log(`${cpus().length} CPUs (${cpuModel}), ${(totalmem() / 2 ** 30).toFixed(1)} GiB, Node ${process.version}; ${seconds} s per row, ${runs} run(s)`)
	for (const w of WORKLOADS) console.log(`  ${w.name}: ${w.what}`)
	const rows: Row[] = []
	for (let run = 1; run <= runs; run++) {
		console.error(`run ${run}/${runs}`)
		const runRows: Row[] = []
		for (const store of stores) runRows.push(...(await measureStore(run, store)))
		rows.push(...runRows)
		if (runs > 1) printTable(`## run ${run}`, runRows, rows)
	}
	console.log(`
msg/s: messages sent (one send call; a 1:1 to a 2-device account is one message). dec/s: device-level
messages decrypted by recipients. dec/CPU-s: decrypted messages per CPU-second of the whole system
(Node + the store's processes, from /proc/<pid>/stat). vs memory: dec/CPU-s over the in-memory store's,
same run, cache mode and workload (then the median over runs). gets/sets per msg: calls reaching the
store (below the cache). req/msg: requests the baileys-store client sent to the service (reads not
answered from memory under its writer claim, writes, claims and renewals).`)
	printTable(runs > 1 ? `## medians of ${runs} runs` : '## results', rows, rows)
} finally {
	for (const c of cleanups.reverse()) await c()
}

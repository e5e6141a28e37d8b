// The client's own CPU per request, against a real nats-server and service (started here, as
// their own processes): keys.set of one 3 KB value and keys.get of an id not stored, one at a
// time (as makeCacheableSignalKeyStore sends them) and 16 at a time, through the client's
// reply multiplexer and through nats.js `request()` (a stand-in connection that has only
// `request`, the path the client took before the multiplexer), interleaved in rounds. Runs
// inside an AsyncLocalStorage context, as Baileys' transactions do: that turns on Node's
// promise hooks, so every promise a request makes costs what it costs in a bot. Only this
// process's CPU is counted (process.cpuUsage). Not a test: it prints figures.
//
//   npm run build:dev && node build/bench/client-cost.js
//
// Environment: COST_REQUESTS (per path and round, default 3000), COST_ROUNDS (default 5),
// COST_ALS=0 (no AsyncLocalStorage context), COST_PATHS (mux,request), COST_CONCURRENCY (1,16),
// BSTORE_BIN. For a profile of one path: COST_PATHS=mux COST_CONCURRENCY=1 node --cpu-prof ...
import { AsyncLocalStorage } from 'node:async_hooks'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import type { NatsConnection } from 'nats'
import { BaileysStoreClient, encodeValue } from '../src/index.js'
import { findServiceBinary, NatsServer, repoDir, Service } from '../test/support/servers.js'

const requests = Number(process.env.COST_REQUESTS ?? 3000)
const rounds = Number(process.env.COST_ROUNDS ?? 5)
const useAls = process.env.COST_ALS !== '0'
const paths = (process.env.COST_PATHS ?? 'mux,request').split(',').map((p) => (p.trim() === 'request' ? 'request()' : 'mux') as Path)
const concurrencies = (process.env.COST_CONCURRENCY ?? '1,16').split(',').map(Number)

const bin = process.env.BSTORE_BIN ?? (existsSync(join(repoDir, 'target/release/baileys-store')) ? join(repoDir, 'target/release/baileys-store') : findServiceBinary())
if (!bin) throw new Error('baileys-store binary not found (BSTORE_BIN, target/release, target/ci or target/debug)')

/** A Signal session record's size, encoded as the auth state encodes it. */
const value = encodeValue({ _sessions: { a: { registrationId: 1, currentRatchet: { rootKey: Buffer.alloc(32, 7) }, chains: Buffer.alloc(2900, 3) } } })

type Path = 'mux' | 'request()'
interface Sample {
	path: Path
	concurrency: number
	userUs: number
	systemUs: number
	wallUs: number
}

async function measure(store: BaileysStoreClient, path: Path, concurrency: number, n: number): Promise<Sample> {
	let i = 0
	const one = async () => {
		const k = i++
		await store.setKeys({ session: { [`u${k % 50}.0`]: value } })
		await store.getKeys('device-list', [`absent${k % 50}`])
	}
	const cpu0 = process.cpuUsage()
	const t0 = performance.now()
	const lanes = Array.from({ length: concurrency }, async () => {
		while (i < n) await one()
	})
	await Promise.all(lanes)
	const wall = performance.now() - t0
	const cpu = process.cpuUsage(cpu0)
	const count = 2 * i // a set and a get per step
	return { path, concurrency, userUs: cpu.user / count, systemUs: cpu.system / count, wallUs: (wall * 1000) / count }
}

const median = (xs: number[]) => {
	const s = [...xs].sort((a, b) => a - b)
	const m = s.length >> 1
	return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

const nats = await NatsServer.start()
const nc: NatsConnection = await nats.connect()
const service = new Service(bin, nats.url)
try {
	await service.start(nc)
	const opts = { tenant: 'cost', session: 's1' }
	const stores: Record<Path, BaileysStoreClient> = {
		mux: new BaileysStoreClient(nc, opts),
		'request()': new BaileysStoreClient({ request: nc.request.bind(nc) }, opts)
	}
	const als = new AsyncLocalStorage<object>()
	const run = <T>(f: () => Promise<T>) => (useAls ? als.run({}, f) : f())
	// Warm-up: JIT, the session loaded in the service.
	for (const path of paths) await run(() => measure(stores[path], path, 1, 500))
	const samples: Sample[] = []
	for (let r = 0; r < rounds; r++) {
		for (const concurrency of concurrencies) {
			for (const path of r % 2 ? [...paths].reverse() : paths) {
				samples.push(await run(() => measure(stores[path], path, concurrency, requests)))
			}
		}
	}
	console.log(`# the client's CPU per request (keys.set 3 KB + keys.get miss), ${rounds} rounds of ${requests} requests, AsyncLocalStorage ${useAls ? 'on' : 'off'}`)
	console.log('path       concurrency  user µs  system µs  total µs  wall µs/req   (medians over rounds)')
	for (const concurrency of concurrencies) {
		for (const path of paths) {
			const s = samples.filter((x) => x.path === path && x.concurrency === concurrency)
			const [u, sy, w] = [median(s.map((x) => x.userUs)), median(s.map((x) => x.systemUs)), median(s.map((x) => x.wallUs))]
			console.log(`${path.padEnd(10)} ${String(concurrency).padStart(11)} ${u.toFixed(1).padStart(8)} ${sy.toFixed(1).padStart(10)} ${(u + sy).toFixed(1).padStart(9)} ${w.toFixed(1).padStart(12)}`)
		}
	}
} finally {
	await nc.close()
	await service.dispose()
	await nats.stop()
}

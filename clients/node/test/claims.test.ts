// The writer claim against the real service: a client answers reads from memory only while its
// claim's lease is valid, and once a second writer of the same session appears the first stops
// before that writer's first write lands — so no read of the first client ever gives a value the
// second has already replaced.
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { performance } from 'node:perf_hooks'
import { after, before, describe, it } from 'node:test'
import type { NatsConnection } from 'nats'
import { BaileysStoreClient, decodeValue, type NatsAuthState, useNatsAuthState } from '../src/index.js'
import { findServiceBinary, NatsServer, Service } from './support/servers.js'
import type { AuthHandle, OpenAuth } from './support/signal-world.js'
import { World } from './support/signal-world.js'

const bin = findServiceBinary()
if (!bin) throw new Error('baileys-store binary not found: build it (target/ci or target/debug) or set BSTORE_BIN')

const tenant = `c${randomBytes(4).toString('hex')}`
const options = { tenant, timeoutMs: 3000, retryDelayMs: 20, maxRetryDelayMs: 200 }
/** The service's claim lease in these tests: short, so that a takeover takes a second or two. */
const LEASE_MS = 1500

let nats: NatsServer
let service: Service
let nc: NatsConnection
const opened: NatsAuthState[] = []

before(async () => {
	nats = await NatsServer.start()
	nc = await nats.connect()
	service = new Service(bin, nats.url)
	service.env.BSTORE__SESSIONS__CLAIM_LEASE_MS = String(LEASE_MS)
	await service.start(nc)
})

after(async () => {
	for (const o of opened) o.close()
	await nc?.close()
	await service?.dispose()
	await nats?.stop()
})

async function open(session: string): Promise<NatsAuthState> {
	const auth = await useNatsAuthState(nc, { ...options, session })
	opened.push(auth)
	return auth
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

/** Waits until `auth` holds a claim whose lease is valid (it asks on first use). */
async function claimed(auth: NatsAuthState): Promise<void> {
	const start = performance.now()
	while (!auth.claim?.valid()) {
		assert.ok(performance.now() - start < 20_000, 'no claim in 20 s')
		await auth.state.keys.get('tctoken', ['__probe'])
		await sleep(20)
	}
}

describe('writer claims', () => {
	it('a second writer appears: after its write of K, the first client never reads the old K', async () => {
		const session = 'takeover'
		const first = await open(session)
		await first.state.keys.set({ tctoken: { K: { token: Buffer.from('v0') } } })
		await claimed(first)
		await first.state.keys.set({ tctoken: { K: { token: Buffer.from('v1') } } })
		const before = first.claim!.stats.fromMemory
		assert.deepEqual((await first.state.keys.get('tctoken', ['K'])).K, { token: Buffer.from('v1') })
		assert.ok(first.claim!.stats.fromMemory > before, 'the first client answers from memory: otherwise this test proves nothing')

		// The first client reads K in a loop for the whole test, as a busy bot does.
		const reads: { start: number; value: string }[] = []
		let reading = true
		const reader = (async () => {
			while (reading) {
				const start = performance.now()
				const got = await first.state.keys.get('tctoken', ['K'])
				reads.push({ start, value: (got.K as { token: Buffer } | undefined)?.token.toString() ?? 'absent' })
				await sleep(1)
			}
		})()

		// A second socket of the same session writes v2, v3, v4; each write is acknowledged at `acked`.
		const second = await open(session)
		const acked: { value: string; at: number }[] = []
		for (const value of ['v2', 'v3', 'v4']) {
			await second.state.keys.set({ tctoken: { K: { token: Buffer.from(value) } } })
			acked.push({ value, at: performance.now() })
			await sleep(LEASE_MS / 3)
		}
		await sleep(200)
		reading = false
		await reader

		const order = ['v1', 'v2', 'v3', 'v4']
		const stale = reads.filter((r) => {
			const newest = acked.filter((a) => a.at <= r.start).at(-1)
			return newest !== undefined && order.indexOf(r.value) < order.indexOf(newest.value)
		})
		assert.deepEqual(stale, [], `reads that started after a newer value was acknowledged and gave an older one (of ${reads.length})`)
		assert.ok(reads.some((r) => r.start > acked[0]!.at), 'the first client kept reading after the second wrote')
		assert.equal(reads.at(-1)?.value, 'v4')
		assert.ok(first.claim!.stats.superseded >= 1, 'the first client was told its claim was superseded')
	})

	it('a holder whose renewals do not get through stops answering from memory when its lease runs out', async () => {
		const session = 'cut-off'
		const first = await open(session)
		await first.state.keys.set({ tctoken: { K: { token: Buffer.from('v1') } } })
		await claimed(first)
		await first.state.keys.set({ tctoken: { K: { token: Buffer.from('v1') } } })
		// From now on the first client's renewals are lost on the way (a network cut of the renewals alone):
		// only its own count of the lease protects it.
		;(first.claim as unknown as { renew: () => Promise<void> }).renew = async () => {}
		const reads: { start: number; value: string; fromMemory: boolean }[] = []
		let reading = true
		const reader = (async () => {
			while (reading) {
				const start = performance.now()
				const before = first.claim!.stats.fromMemory
				const got = await first.state.keys.get('tctoken', ['K'])
				reads.push({ start, value: (got.K as { token: Buffer }).token.toString(), fromMemory: first.claim!.stats.fromMemory > before })
				await sleep(1)
			}
		})()
		const second = await open(session)
		await second.state.keys.set({ tctoken: { K: { token: Buffer.from('v2') } } })
		const acked = performance.now()
		await sleep(300)
		reading = false
		await reader
		const stale = reads.filter((r) => r.start >= acked && r.value !== 'v2')
		assert.deepEqual(stale, [], 'reads after the second writer was acknowledged gave the old value')
		assert.ok(reads.some((r) => r.fromMemory), 'the first client answered from memory while its lease ran')
		assert.ok(reads.some((r) => r.start >= acked), 'the first client read after the second wrote')
	})

	it('a claim superseded while its holder writes: the write still lands, without the claim', async () => {
		const session = 'write-on'
		const first = await open(session)
		await claimed(first)
		const second = await open(session)
		// The second asks for the claim (and so supersedes the first) on its first use.
		await second.state.keys.get('tctoken', ['x'])
		await first.state.keys.set({ tctoken: { K: { token: Buffer.from('from-first') } } })
		const plain = new BaileysStoreClient(nc, { ...options, session })
		assert.equal(Object.keys(await plain.getKeys('tctoken', ['K'])).length, 1)
		assert.ok(first.claim!.stats.superseded >= 1)
		assert.deepEqual((await second.state.keys.get('tctoken', ['K'])).K, { token: Buffer.from('from-first') })
	})

	it('Baileys sockets restarted while the old ones still run: the old ones read what the new ones wrote', async () => {
		const handles = new Map<string, AuthHandle[]>()
		const openAuth: OpenAuth = async (device) => {
			const auth = await open(device)
			const handle = { state: auth.state, saveCreds: auth.saveCreds }
			handles.set(device, [...(handles.get(device) ?? []), handle])
			return handle
		}
		const world = new World(openAuth)
		await world.setup()
		for (let round = 0; round < 3; round++) await world.directRound(round)
		const servedFromMemory = opened.slice(-world.devices.length).reduce((n, o) => n + (o.claim?.stats.fromMemory ?? 0), 0)
		assert.ok(servedFromMemory > 0, 'the first sockets answered reads from memory')

		// New sockets for every device (a restarted bot), the old ones still open; the new ones talk.
		await world.reopen()
		for (let round = 3; round < 6; round++) await world.directRound(round)
		assert.deepEqual(world.failures, [])

		// Every Signal session and tctoken the old socket of a device reads now is what the store holds.
		for (const d of world.devices) {
			const [old] = handles.get(d.name)!
			const plain = new BaileysStoreClient(nc, { ...options, session: d.name })
			const ids: string[] = []
			let after: string | undefined
			for (;;) {
				const page = await plain.listKeys('session', after)
				ids.push(...page.ids)
				if (page.next === null) break
				after = page.next
			}
			assert.ok(ids.length > 0)
			const fromOld = await old!.state.keys.get('session', ids)
			const stored = await plain.getKeys('session', ids)
			for (const id of ids) {
				assert.deepStrictEqual(fromOld[id], decodeValue(stored[id]!), `${d.name} session ${id}`)
			}
		}
	})
})

// A service outage longer than the client's old retry budget (about 3 s), against the
// real service and with the client's default options: requests pending while the
// service is down must wait for it and succeed, and Baileys' Signal sessions must come
// through untouched. A request that gave up instead would make Baileys' validateSession
// report "no session", and libsignal would replace the session with a new one.
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { after, before, describe, it } from 'node:test'
import type { NatsConnection } from 'nats'
import { BaileysStoreClient, BaileysStoreError, useNatsAuthState } from '../src/index.js'
import { findServiceBinary, NatsServer, Service } from './support/servers.js'
import { World } from './support/signal-world.js'
import { natsStore } from './support/stores.js'

const bin = findServiceBinary()
if (!bin) {
	throw new Error('baileys-store binary not found: build it (target/ci or target/debug) or set BSTORE_BIN')
}

const OUTAGE_MS = 5_000
const tenant = `t${randomBytes(4).toString('hex')}`
const retried: { op: string; code: string | number; elapsedMs: number }[] = []
// Nothing but the tenant and a logger: the defaults are what is under test.
const options = { tenant, logger: { warn: (obj: object) => void retried.push(obj as (typeof retried)[number]) } }

let nats: NatsServer
let service: Service
let nc: NatsConnection

before(async () => {
	nats = await NatsServer.start()
	nc = await nats.connect()
	service = new Service(bin, nats.url)
	await service.start(nc)
})

after(async () => {
	await nc?.close()
	await service?.dispose()
	await nats?.stop()
})

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

describe(`a ${OUTAGE_MS / 1000} s outage of the service`, () => {
	it('reads and writes sent after a kill -9 wait for it to come back and succeed', async () => {
		const store = new BaileysStoreClient(nc, { ...options, session: 'pending' })
		const { state, saveCreds } = await useNatsAuthState(nc, { ...options, session: 'pending' })
		await state.keys.set({ 'pre-key': { '1': { public: Buffer.from([1]), private: Buffer.from([2]) } } })
		await saveCreds()
		const before = await store.info()

		await service.kill()
		const down = performance.now()
		try {
			// What the client allowed before: 5 retries from 100 ms. The outage must outlast it.
			const oldBudget = new BaileysStoreClient(nc, { tenant, session: 'pending', retries: 5, retryDelayMs: 100, maxRetryDelayMs: 2000 }).getKeys('pre-key', ['1'])
			// '2' is an id this client has never read or written: whatever its writer claim lets it answer
			// from memory, that one needs the service.
			const read = Promise.resolve(state.keys.get('pre-key', ['1', '2']))
			const creds = useNatsAuthState(nc, { ...options, session: 'pending' })
			const write = store.setKeys({ 'lid-mapping': { '15550001001': new Uint8Array([1, 2, 3]) } })
			const pending = new Set(['read', 'creds', 'write'])
			for (const [name, p] of Object.entries({ read, creds, write })) {
				p.then(
					() => pending.delete(name),
					() => pending.delete(name)
				)
			}

			await assert.rejects(oldBudget, (err: unknown) => err instanceof BaileysStoreError && err.code === 'NO_RESPONDERS')
			await sleep(OUTAGE_MS - (performance.now() - down))
			assert.deepEqual([...pending], ['read', 'creds', 'write'], 'requests are still pending when the service comes back')
			await service.start(nc)

			assert.deepEqual(await read, { '1': { public: Buffer.from([1]), private: Buffer.from([2]) } })
			assert.equal((await creds).state.creds.registrationId, state.creds.registrationId)
			const seq = await write
			const waited = performance.now() - down
			assert.ok(waited >= OUTAGE_MS, `resolved after ${Math.round(waited)} ms`)
			// Applied once, as the last change of the session.
			const afterInfo = await store.info()
			assert.equal(afterInfo.seq, seq)
			assert.equal(afterInfo.events, before.events + 1)
			assert.equal(afterInfo.keys['lid-mapping'], 1)
			assert.ok(retried.some((r) => r.op === 'keys.set' && r.code === 'NO_RESPONDERS'), 'the write was retried')
		} finally {
			// The next test needs the service, whatever happened here.
			if (service.pid === undefined) await service.start(nc)
		}
	})

	it('Baileys traffic through a stop and restart: no decrypt failure, no session replaced', async () => {
		// libsignal reports a session it replaces on the console; Baileys' logger does not see it.
		const closings: string[] = []
		const original = { warn: console.warn, info: console.info }
		const watch =
			(write: (...args: unknown[]) => void) =>
			(...args: unknown[]) => {
				const line = String(args[0])
				if (line.startsWith('Closing')) closings.push(line)
				else if (!line.startsWith('Opening session')) write(...args)
			}
		console.warn = watch(original.warn)
		console.info = watch(original.info)
		try {
			const world = new World(natsStore(nc, options))
			await world.setup()
			let round = 0
			// Every pair of devices has a session after one round.
			for (; round < 2; round++) {
				await world.directRound(round)
				await world.groupRound(round)
			}
			// Then without Baileys' key cache, as after a restart of the bot or once cache entries expire:
			// every read goes to the store, among them validateSession's read of the session.
			await world.reopen(false)
			const devices = world.devices.map((d) => new BaileysStoreClient(nc, { ...options, session: d.name }))
			const keysBefore = await Promise.all(devices.map(async (d) => (await d.info()).keys))

			let back = false
			const roundMs: number[] = []
			const traffic = (async () => {
				// Rounds go on through the outage, and two more once the service is back.
				for (let extra = 0; extra < 2; round++) {
					if (back) extra++
					const start = performance.now()
					await world.directRound(round)
					await world.groupRound(round)
					roundMs.push(performance.now() - start)
				}
			})()
			await sleep(300)
			const retriedBefore = retried.length
			// A clean stop answers what is in flight; what comes next finds no responders until the restart.
			await service.stop()
			await sleep(OUTAGE_MS)
			await service.start(nc)
			back = true
			await traffic

			const during = retried.slice(retriedBefore)
			assert.ok(during.length > 0, 'the outage hit requests in flight')
			// One round waited for the whole outage: longer than the old budget's pauses could add up to (3.1 s).
			const longest = Math.max(...roundMs)
			assert.ok(longest >= OUTAGE_MS - 500, `the longest round took ${Math.round(longest)} ms`)
			console.log(`${during.length} retries during the outage; longest round ${Math.round(longest)} ms; ${round} rounds`)

			assert.deepEqual(world.failures, [])
			assert.equal(world.delivered, round * 21)
			assert.deepEqual(world.logger.problems.filter((p) => p.startsWith('error')), [])
			assert.deepEqual(closings, [], 'libsignal replaced sessions')
			// A replaced session would have taken a new pre-key bundle; no pre-key was used and no session added.
			const keysAfter = await Promise.all(devices.map(async (d) => (await d.info()).keys))
			for (const [i, d] of world.devices.entries()) {
				assert.equal(keysAfter[i]!['pre-key'], keysBefore[i]!['pre-key'], `${d.name} pre-keys`)
				assert.equal(keysAfter[i]!.session, keysBefore[i]!.session, `${d.name} sessions`)
			}
		} finally {
			console.warn = original.warn
			console.info = original.info
		}
	})
})

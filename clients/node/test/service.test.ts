// Against the real service: a nats-server with JetStream and the baileys-store binary,
// both started here, with Baileys' own Signal code driving the store.
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { after, before, describe, it } from 'node:test'
import { BufferJSON, proto, type SignalDataSet, useMultiFileAuthState } from '@whiskeysockets/baileys'
import type { NatsConnection } from 'nats'
import { BaileysStoreClient, BaileysStoreError, useNatsAuthState } from '../src/index.js'
import { findServiceBinary, NatsServer, removeDir, Service, tempDir } from './support/servers.js'
import { World } from './support/signal-world.js'
import { fileStore, natsStore, type SetLog } from './support/stores.js'

const bin = findServiceBinary()
if (!bin) {
	throw new Error('baileys-store binary not found: build it (target/ci or target/debug) or set BSTORE_BIN')
}

const ROUNDS = 12
const tenant = `t${randomBytes(4).toString('hex')}`
// Generous retries: the service is stopped and killed under the bots' feet.
const retried: { op: string; code: string | number }[] = []
const options = {
	tenant,
	timeoutMs: 2000,
	retries: 40,
	retryDelayMs: 50,
	maxRetryDelayMs: 500,
	logger: { warn: (obj: object) => void retried.push(obj as (typeof retried)[number]) }
}

let nats: NatsServer
let service: Service
let nc: NatsConnection
const dirs: string[] = []

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
	for (const d of dirs) removeDir(d)
})

async function assertRejects(p: Promise<unknown>, code: number | string): Promise<BaileysStoreError> {
	let caught: unknown
	try {
		await p
	} catch (err) {
		caught = err
	}
	assert.ok(caught instanceof BaileysStoreError, `expected BaileysStoreError ${code}, got ${String(caught)}`)
	assert.equal(caught.code, code, caught.message)
	return caught
}

describe('Baileys Signal sessions over baileys-store', () => {
	let natsTranscript: Record<string, string[]>

	it('1:1 and group messages survive a clean restart and a kill -9 of the service', async () => {
		const log: SetLog = { sets: [] }
		const world = new World(natsStore(nc, options, log))
		await world.setup()

		// The first pre-key upload is one keys.set with all 812 pre-keys (the socket's transaction).
		const upload = log.sets.find((s) => s.types.includes('pre-key'))
		assert.ok(upload && upload.ids >= 812, `pre-key upload was ${JSON.stringify(upload)}`)
		for (const d of world.devices) {
			const info = await new BaileysStoreClient(nc, { ...options, session: d.name }).info()
			assert.equal(info.creds, true)
			assert.equal(info.keys['pre-key'], 812)
		}

		let round = 0
		const play = async (n: number) => {
			for (const end = round + n; round < end; round++) {
				await world.directRound(round)
				await world.groupRound(round)
			}
		}
		await play(3)

		// Clean restart between messages.
		await service.stop()
		await service.start(nc)
		await play(3)

		// kill -9 while messages are in flight; the client retries with the same rid until it is back.
		const inFlight = play(3)
		await new Promise((r) => setTimeout(r, 300))
		const retriedBefore = retried.length
		await service.kill()
		await new Promise((r) => setTimeout(r, 500))
		await service.start(nc)
		await inFlight
		assert.ok(retried.length > retriedBefore, 'the kill -9 hit requests in flight')
		console.log(`retried while the service was down: ${JSON.stringify(retried.slice(retriedBefore, retriedBefore + 3))} (${retried.length - retriedBefore} in all)`)

		// A bot restarted now must find everything in the store: drop every cache and go on.
		await world.reopen()
		await play(ROUNDS - round)

		assert.deepEqual(world.failures, [])
		assert.equal(world.delivered, ROUNDS * 21)
		assert.deepEqual(world.logger.problems.filter((p) => p.startsWith('error')), [])

		// Pre-keys were consumed one per pkmsg and deleted from the store.
		const bob = await new BaileysStoreClient(nc, { ...options, session: 'bob-1' }).info()
		assert.ok(bob.keys['pre-key']! < 812, `bob still has ${bob.keys['pre-key']} pre-keys`)
		assert.ok(bob.keys['identity-key']! >= 1)
		// Sessions with alice-1, alice-2 and carol-3; sender keys of all four devices.
		assert.deepEqual([bob.keys.session, bob.keys['sender-key'], bob.keys['sender-key-memory'], bob.keys['device-list']], [3, 4, 1, 3])
		natsTranscript = world.transcript()
	})

	it("gives the same plaintexts as Baileys' useMultiFileAuthState", async () => {
		assert.ok(natsTranscript, 'needs the previous test')
		const dir = tempDir('bstore-files-')
		dirs.push(dir)
		const world = new World(fileStore(dir))
		await world.setup()
		for (let round = 0; round < ROUNDS; round++) {
			await world.directRound(round)
			await world.groupRound(round)
		}
		assert.deepEqual(world.failures, [])
		assert.deepEqual(natsTranscript, world.transcript())
	})
})

/** Realistic values of the ten v7 key types. */
function allKeyTypes(): SignalDataSet {
	const b64 = (n: number) => randomBytes(n).toString('base64')
	return {
		'pre-key': { '1': { public: randomBytes(32), private: randomBytes(32) }, '812': { public: randomBytes(32), private: randomBytes(32) } },
		session: {
			'100000000000002_1.1': {
				_sessions: {
					[b64(33)]: {
						registrationId: 4242,
						currentRatchet: { ephemeralKeyPair: { pubKey: b64(33), privKey: b64(32) }, lastRemoteEphemeralKey: b64(33), previousCounter: 3, rootKey: b64(32) },
						indexInfo: { baseKey: b64(33), baseKeyType: 1, closed: -1, used: 1700000000000, created: 1700000000000, remoteIdentityKey: b64(33) },
						_chains: { [b64(33)]: { chainKey: { counter: 5, key: b64(32) }, chainType: 1, messageKeys: { '4': b64(32) } } }
					}
				},
				version: 'v1'
			} as never
		},
		'sender-key': { [`120363000000000001@g.us::100000000000001_1::1`]: Buffer.from(JSON.stringify([{ senderKeyId: 7, senderChainKey: { iteration: 2, seed: b64(32) }, senderSigningKey: { public: b64(33) }, senderMessageKeys: [] }])) },
		'sender-key-memory': { '120363000000000001@g.us': { '100000000000002:1@lid': true, '100000000000003:3@lid': true } },
		'app-state-sync-key': { AAAAAFEx: { keyData: randomBytes(32), fingerprint: { rawId: 123, currentIndex: 2, deviceIndexes: [0, 1, 2] }, timestamp: 1700000000123 } },
		'app-state-sync-version': {
			regular_high: {
				version: 42,
				hash: randomBytes(128),
				indexValueMap: Object.fromEntries(Array.from({ length: 50 }, () => [b64(32), { valueMac: randomBytes(32) }]))
			}
		},
		'lid-mapping': { '15550001001': '100000000000001', '100000000000001_reverse': '15550001001' },
		'device-list': { '100000000000001': ['0', '1', '2'] },
		tctoken: {
			'100000000000002@lid': { token: randomBytes(20), timestamp: '1700000000', senderTimestamp: 1700000001 },
			__index: { token: Buffer.from(JSON.stringify(['100000000000002@lid'])) }
		},
		'identity-key': { '100000000000002_1.1': Buffer.concat([Buffer.from([5]), randomBytes(32)]) }
	}
}

describe('key types and creds', () => {
	it('stores all ten v7 key types and reads them back as useMultiFileAuthState does', async () => {
		const data = allKeyTypes()
		const { state } = await useNatsAuthState(nc, { ...options, session: 'all-types' })
		await state.keys.set(data)
		const dir = tempDir('bstore-files-')
		dirs.push(dir)
		const files = await useMultiFileAuthState(dir)
		await files.state.keys.set(data)

		const info = await new BaileysStoreClient(nc, { ...options, session: 'all-types' }).info()
		assert.equal(Object.keys(info.keys).length, 10)

		for (const [type, values] of Object.entries(data)) {
			const ids = Object.keys(values!)
			const got = await state.keys.get(type as never, [...ids, 'absent-id'])
			const fromFiles = await files.state.keys.get(type as never, ids)
			assert.deepEqual(Object.keys(got).sort(), [...ids].sort(), `${type}: only found ids`)
			assert.deepStrictEqual(got, fromFiles, type)
			if (type === 'app-state-sync-key') {
				assert.ok((got[ids[0]!] as object) instanceof proto.Message.AppStateSyncKeyData)
			} else {
				assert.deepStrictEqual(got, values, type)
			}
		}

		// null deletes, in the same request as a write of another type.
		await state.keys.set({ 'pre-key': { '1': null }, 'lid-mapping': { '15550001002': '100000000000002' } })
		assert.deepEqual(Object.keys(await state.keys.get('pre-key', ['1', '812'])), ['812'])
		assert.deepEqual(await state.keys.get('lid-mapping', ['15550001002']), { '15550001002': '100000000000002' })
	})

	it('reads values that together exceed one NATS message', async () => {
		const { state } = await useNatsAuthState(nc, { ...options, session: 'big-values' })
		const big: Record<string, Buffer> = {}
		for (let i = 0; i < 5; i++) {
			big[String(i)] = randomBytes(1900 * 1024)
			await state.keys.set({ 'identity-key': { [String(i)]: big[String(i)]! } })
		}
		// About 9.5 MB of values: the service refuses one reply that large (413) and the client asks for halves.
		assert.deepStrictEqual(await state.keys.get('identity-key', Object.keys(big)), big)
	})

	it('creds are created once, saved whole, read back equal, and cleared', async () => {
		const first = await useNatsAuthState(nc, { ...options, session: 'creds' })
		first.state.creds.me = { id: '15550009999:4@s.whatsapp.net', lid: '100000000009999:4@lid', name: 'Bot' }
		first.state.creds.routingInfo = randomBytes(20)
		await first.saveCreds()
		const second = await useNatsAuthState(nc, { ...options, session: 'creds' })
		// Exactly what Baileys' file store would give back.
		assert.deepStrictEqual(second.state.creds, JSON.parse(JSON.stringify(first.state.creds, BufferJSON.replacer), BufferJSON.reviver))
		assert.ok(Buffer.isBuffer(second.state.creds.noiseKey.private))
		assert.deepStrictEqual(second.state.creds.routingInfo, first.state.creds.routingInfo)
		assert.equal(second.state.creds.registrationId, first.state.creds.registrationId)

		await second.clear()
		const info = await second.store.info()
		assert.equal(info.creds, false)
		const third = await useNatsAuthState(nc, { ...options, session: 'creds' })
		assert.notEqual(third.state.creds.advSecretKey, first.state.creds.advSecretKey)
	})
})

describe('errors', () => {
	it('a value over the limit throws TOO_LARGE before anything is sent', async () => {
		const { state, store } = await useNatsAuthState(nc, { ...options, session: 'limits' })
		const before = await store.info()
		await assertRejects(Promise.resolve(state.keys.set({ 'app-state-sync-version': { big: { version: 1, hash: randomBytes(128), indexValueMap: { x: { valueMac: randomBytes(3 * 1024 * 1024) } } } } })), 'TOO_LARGE')
		const many = Object.fromEntries(Array.from({ length: 3 }, (_, i) => [String(i), randomBytes(1.5 * 1024 * 1024)]))
		await assertRejects(Promise.resolve(state.keys.set({ 'identity-key': many })), 'TOO_LARGE')
		assert.equal((await store.info()).seq, before.seq)
	})

	it('the service refuses what the client lets through when its limits are lower', async () => {
		// With the client's own checks off, the service's 2 MiB value limit answers 413.
		const { state } = await useNatsAuthState(nc, { ...options, session: 'limits2', maxValueBytes: Infinity })
		await assertRejects(Promise.resolve(state.keys.set({ 'identity-key': { x: randomBytes(3 * 1024 * 1024) } })), 413)
	})

	it('a bad session id throws before sending', async () => {
		for (const session of ['a.b', 'bad id', '*', '', 'x'.repeat(129)]) {
			await assertRejects(useNatsAuthState(nc, { ...options, session }), 'INVALID_ID')
		}
	})

	it('the service answers 422 to a session id the client would refuse', async () => {
		const msg = await nc.request(`bstore.${tenant}.bad$id.session.info`, new Uint8Array(0), { timeout: 2000 })
		assert.equal(msg.headers?.get('Nats-Service-Error-Code'), '422')
	})

	it('a request while the service is stopped throws instead of resolving empty', async () => {
		const quick = { ...options, session: 'stopped', retries: 2, retryDelayMs: 10 }
		const { state } = await useNatsAuthState(nc, quick)
		await state.keys.set({ 'lid-mapping': { '1': '2' } })
		await service.stop()
		try {
			await assertRejects(useNatsAuthState(nc, quick), 'NO_RESPONDERS')
			await assertRejects(Promise.resolve(state.keys.get('lid-mapping', ['1'])), 'NO_RESPONDERS')
			const store = new BaileysStoreClient(nc, quick)
			await assertRejects(store.getKeys('lid-mapping', ['1']), 'NO_RESPONDERS')
			await assertRejects(store.setKeys({ 'lid-mapping': { '1': null } }), 'NO_RESPONDERS')
		} finally {
			await service.start(nc)
		}
		assert.deepEqual(await state.keys.get('lid-mapping', ['1']), { '1': '2' })
	})
})

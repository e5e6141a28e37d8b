// list and listIds of the key store, against the real service with small pages.
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { after, before, describe, it } from 'node:test'
import { proto, type SignalDataSet, type SignalKeyStore } from '@whiskeysockets/baileys'
import type { NatsConnection } from 'nats'
import { BaileysStoreError, useNatsAuthState } from '../src/index.js'
import { findServiceBinary, NatsServer, Service } from './support/servers.js'

const bin = findServiceBinary()
if (!bin) {
	throw new Error('baileys-store binary not found: build it (target/ci or target/debug) or set BSTORE_BIN')
}

/** The service's ids per call here: 812 pre-keys take 17 pages. */
const CAP = 50
const options = { tenant: `t${randomBytes(4).toString('hex')}`, timeoutMs: 3000 }

let nats: NatsServer
let service: Service
let nc: NatsConnection

before(async () => {
	nats = await NatsServer.start()
	nc = await nats.connect()
	process.env.BSTORE__LIMITS__MAX_IDS_PER_CALL = String(CAP)
	service = new Service(bin, nats.url)
	delete process.env.BSTORE__LIMITS__MAX_IDS_PER_CALL
	await service.start(nc)
})

after(async () => {
	await nc?.close()
	await service?.dispose()
	await nats?.stop()
})

const byteOrder = (a: string, b: string) => Buffer.compare(Buffer.from(a), Buffer.from(b))

async function collect<T>(items: AsyncIterable<T>): Promise<T[]> {
	const out: T[] = []
	for await (const item of items) out.push(item)
	return out
}

/** Writes `data` of one type, at most CAP ids per set. */
async function setInChunks(keys: SignalKeyStore, type: keyof SignalDataSet, values: Record<string, unknown>): Promise<void> {
	const entries = Object.entries(values)
	for (let i = 0; i < entries.length; i += CAP) {
		await keys.set({ [type]: Object.fromEntries(entries.slice(i, i + CAP)) } as SignalDataSet)
	}
}

describe('enumeration', () => {
	it('listIds and list page through a type in byte order, values as get gives them', async () => {
		const { state } = await useNatsAuthState(nc, { ...options, session: 'many' })
		const preKeys: Record<string, { public: Buffer; private: Buffer }> = {}
		for (let i = 1; i <= 812; i++) preKeys[String(i)] = { public: randomBytes(32), private: randomBytes(32) }
		await setInChunks(state.keys, 'pre-key', preKeys)
		await state.keys.set({
			'lid-mapping': { '15550001001': '100000000000001', '100000000000001_reverse': '15550001001' },
			'app-state-sync-key': { AAAAAFEx: { keyData: randomBytes(32), fingerprint: { rawId: 1, currentIndex: 2, deviceIndexes: [0] }, timestamp: 1700000000123 } } as never
		})

		const ids = await collect(state.keys.listIds('pre-key'))
		const expected = Object.keys(preKeys).sort(byteOrder)
		assert.deepEqual(ids, expected, 'every id once, in byte order ("1", "10", "100", ...)')
		assert.deepEqual(ids.slice(0, 4), ['1', '10', '100', '101'])

		const entries = await collect(state.keys.list('pre-key'))
		assert.deepEqual(
			entries.map(([id]) => id),
			expected
		)
		for (const [id, value] of entries) assert.deepStrictEqual(value, preKeys[id], id)
		assert.ok(Buffer.isBuffer(entries[0]![1].public))

		// Types come back as get gives them: the protobuf object for app-state-sync-key.
		const [[syncId, sync]] = (await collect(state.keys.list('app-state-sync-key'))) as [[string, unknown]]
		assert.equal(syncId, 'AAAAAFEx')
		assert.ok(sync instanceof proto.Message.AppStateSyncKeyData)
		assert.deepStrictEqual(await collect(state.keys.list('lid-mapping')), [
			['100000000000001_reverse', '15550001001'],
			['15550001001', '100000000000001']
		])
		// Nothing stored under a type: nothing listed.
		assert.deepEqual(await collect(state.keys.listIds('sender-key')), [])
		assert.deepEqual(await collect(state.keys.list('session')), [])

		// What Baileys' migrateAuthState does with them: copy a store through list and set.
		const copy = await useNatsAuthState(nc, { ...options, session: 'many-copy' })
		for (const type of ['pre-key', 'lid-mapping'] as const) {
			const batch: Record<string, unknown> = {}
			for await (const [id, value] of state.keys.list(type)) batch[id] = value
			await setInChunks(copy.state.keys, type, batch)
		}
		assert.deepEqual(await collect(copy.state.keys.listIds('pre-key')), expected)
		assert.deepStrictEqual(await copy.state.keys.get('pre-key', ['1', '812']), { '1': preKeys['1'], '812': preKeys['812'] })
		const info = await copy.store.info()
		assert.deepEqual(info.keys, { 'pre-key': 812, 'lid-mapping': 2 })

		// The key store is still a SignalKeyStore for Baileys.
		const plain: SignalKeyStore = state.keys
		assert.equal(typeof plain.get, 'function')
	})

	it('listKeys pages with a cursor, and the service refuses a page over its cap', async () => {
		const { state, store } = await useNatsAuthState(nc, { ...options, session: 'pages' })
		await state.keys.set({ 'sender-key-memory': { a: { x: true }, b: { y: true }, c: { z: true } } })
		const first = await store.listKeys('sender-key-memory', undefined, 2)
		assert.deepEqual(first.ids, ['a', 'b'])
		assert.equal(first.next, 'b')
		assert.ok(first.seq > 0)
		const second = await store.listKeys('sender-key-memory', first.next!, 2)
		assert.deepEqual(second, { ids: ['c'], next: null, seq: first.seq })
		// A page over the service's ids-per-call limit: 413 from the service.
		await assert.rejects(store.listKeys('sender-key-memory', undefined, CAP + 1), (err: unknown) => {
			assert.ok(err instanceof BaileysStoreError)
			assert.equal(err.code, 413)
			assert.match(err.message, /keys\.list/)
			return true
		})
		// Refused before sending: a malformed type, cursor or limit.
		await assert.rejects(store.listKeys('bad type'), (err: unknown) => err instanceof BaileysStoreError && err.code === 'INVALID_ID')
		await assert.rejects(store.listKeys('session', ''), (err: unknown) => err instanceof BaileysStoreError && err.code === 'INVALID_ID')
		for (const limit of [0, -1, 1.5, Number.NaN]) {
			await assert.rejects(store.listKeys('session', undefined, limit), (err: unknown) => err instanceof BaileysStoreError && err.code === 'INVALID_VALUE')
		}
	})
})

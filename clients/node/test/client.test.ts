// The request layer and useNatsAuthState against a stand-in for the NATS connection:
// what goes on the wire, retries, limits and errors, without a server.
import assert from 'node:assert/strict'
import { describe, it } from 'node:test'
import { decode, encode } from '@msgpack/msgpack'
import type { Msg, NatsConnection } from 'nats'
import { BaileysStoreClient, BaileysStoreError, decodeValue, encodeValue, useNatsAuthState } from '../src/index.js'

type Sent = { subject: string; body: Record<string, any>; timeout: number }
type Reply = Record<string, unknown> | { error: number | string; message?: string } | { natsError: string }

/** Answers requests from a script of replies, recording what was sent. */
function fakeNats(replies: Reply[] | ((sent: Sent) => Reply | Promise<Reply>)) {
	const sent: Sent[] = []
	const nc = {
		async request(subject: string, data?: Uint8Array, opts?: { timeout: number }): Promise<Msg> {
			const s: Sent = { subject, body: decode(data!) as Record<string, any>, timeout: opts!.timeout }
			sent.push(s)
			const reply = typeof replies === 'function' ? await replies(s) : replies.shift()
			if (!reply) throw new Error('unexpected request')
			if ('natsError' in reply) throw Object.assign(new Error(String(reply.natsError)), { code: reply.natsError })
			if ('error' in reply) {
				const headers = new Map([
					['Nats-Service-Error-Code', String(reply.error)],
					['Nats-Service-Error', reply.message ?? 'boom']
				])
				return { data: new Uint8Array(0), headers: { get: (k: string) => headers.get(k) ?? '' } } as unknown as Msg
			}
			return { data: encode(reply), headers: undefined } as unknown as Msg
		}
	}
	return { nc: nc as unknown as NatsConnection, sent }
}

const opts = { tenant: 'acme', session: 'bot-1', retryDelayMs: 1, maxRetryDelayMs: 2 }

async function rejectsWith(p: Promise<unknown> | (() => unknown), code: number | string): Promise<BaileysStoreError> {
	let caught: unknown
	try {
		await (typeof p === 'function' ? p() : p)
	} catch (err) {
		caught = err
	}
	assert.ok(caught instanceof BaileysStoreError, `expected BaileysStoreError ${code}, got ${String(caught)}`)
	assert.equal(caught.code, code)
	return caught
}

describe('request layer', () => {
	it('builds subjects from prefix, tenant, session and op', async () => {
		const { nc, sent } = fakeNats([{ seq: 0, exists: false }, { creds: null, seq: 0 }])
		const store = new BaileysStoreClient(nc, { ...opts, prefix: 'corp.wa', timeoutMs: 1234 })
		await store.info()
		await store.getCreds()
		assert.deepEqual(sent.map((s) => s.subject), ['corp.wa.acme.bot-1.session.info', 'corp.wa.acme.bot-1.creds.get'])
		assert.equal(sent[0]!.timeout, 1234)
	})

	it('refuses bad tenant, session and prefix before sending', async () => {
		const { nc, sent } = fakeNats([])
		for (const session of ['', 'a.b', 'a*', '>', 'a b', 'é', 'x'.repeat(129)]) {
			await rejectsWith(() => new BaileysStoreClient(nc, { ...opts, session }), 'INVALID_ID')
			await rejectsWith(useNatsAuthState(nc, { ...opts, session }), 'INVALID_ID')
		}
		await rejectsWith(() => new BaileysStoreClient(nc, { ...opts, tenant: 'a.b' }), 'INVALID_ID')
		await rejectsWith(() => new BaileysStoreClient(nc, { ...opts, prefix: 'a.*' }), 'INVALID_ID')
		new BaileysStoreClient(nc, { ...opts, session: 'A-z_0'.padEnd(128, '9') })
		assert.equal(sent.length, 0)
	})

	it('refuses bad key types and ids before sending', async () => {
		const { nc, sent } = fakeNats([])
		const store = new BaileysStoreClient(nc, opts)
		await rejectsWith(store.getKeys('bad type', ['1']), 'INVALID_ID')
		await rejectsWith(store.getKeys('session', ['']), 'INVALID_ID')
		await rejectsWith(store.setKeys({ session: { 'a\nb': null } }), 'INVALID_ID')
		await rejectsWith(store.setKeys({ session: { ['é'.repeat(257)]: null } }), 'INVALID_ID')
		assert.equal(sent.length, 0)
	})

	it('refuses a request over maxRequestBytes or a value over maxValueBytes before sending', async () => {
		const { nc, sent } = fakeNats([])
		const store = new BaileysStoreClient(nc, { ...opts, maxRequestBytes: 1000, maxValueBytes: 600 })
		await rejectsWith(store.setKeys({ 'pre-key': { 1: new Uint8Array(500), 2: new Uint8Array(500) } }), 'TOO_LARGE')
		await rejectsWith(store.putCreds(new Uint8Array(601)), 'TOO_LARGE')
		await rejectsWith(store.getKeys('session', Array.from({ length: 200 }, (_, i) => `user${i}.0`)), 'TOO_LARGE')
		assert.equal(sent.length, 0)
	})

	it('retries time-outs, no responders, 409, 503 and 504 with the same rid', async () => {
		const { nc, sent } = fakeNats([{ natsError: 'TIMEOUT' }, { natsError: '503' }, { error: 409 }, { error: 503 }, { error: 504 }, { seq: 7 }])
		const store = new BaileysStoreClient(nc, { ...opts, retries: 5 })
		assert.equal(await store.setKeys({ session: { 'a.0': new Uint8Array([1]) } }), 7)
		assert.equal(sent.length, 6)
		const rid = sent[0]!.body.rid
		assert.match(rid, /^[A-Za-z0-9_-]{22}$/)
		assert.ok(sent.every((s) => s.body.rid === rid))
	})

	it('gives a fresh rid to every write', async () => {
		const { nc, sent } = fakeNats(() => ({ seq: 1 }))
		const store = new BaileysStoreClient(nc, opts)
		await store.putCreds(new Uint8Array([1]))
		await store.putCreds(new Uint8Array([1]))
		await store.setKeys({ session: { 'a.0': null } })
		await store.deleteSession()
		assert.equal(new Set(sent.map((s) => s.body.rid)).size, 4)
	})

	it('throws the last error once retries are used up', async () => {
		const { nc, sent } = fakeNats(() => ({ natsError: 'TIMEOUT' }))
		const err = await rejectsWith(new BaileysStoreClient(nc, { ...opts, retries: 2 }).getCreds(), 'TIMEOUT')
		assert.equal(sent.length, 3)
		assert.equal(err.retryable, true)
		const down = fakeNats(() => ({ natsError: '503' }))
		await rejectsWith(new BaileysStoreClient(down.nc, { ...opts, retries: 1 }).getKeys('session', ['a.0']), 'NO_RESPONDERS')
	})

	it('does not retry refusals and reports the service code', async () => {
		for (const code of [400, 404, 413, 422, 500, 520]) {
			const { nc, sent } = fakeNats([{ error: code, message: 'no' }])
			const err = await rejectsWith(new BaileysStoreClient(nc, opts).getKeys('session', ['a.0']), code)
			assert.equal(sent.length, 1)
			assert.equal(err.retryable, false)
			assert.equal(err.op, 'keys.get')
		}
	})

	it('reports unreadable replies', async () => {
		await rejectsWith(new BaileysStoreClient(fakeNats([{ values: 'x', seq: 1 }]).nc, opts).getKeys('session', ['a.0']), 'BAD_REPLY')
		await rejectsWith(new BaileysStoreClient(fakeNats([{ creds: 'x', seq: 1 }]).nc, opts).getCreds(), 'BAD_REPLY')
		await rejectsWith(new BaileysStoreClient(fakeNats([{ error: 'x' }]).nc, opts).getCreds(), 'BAD_REPLY')
	})

	it('asks for halves when the reply would be too large (413)', async () => {
		const { nc, sent } = fakeNats((s) =>
			s.body.ids.length > 2 ? { error: 413, message: 'reply too large' } : { values: Object.fromEntries(s.body.ids.map((id: string) => [id, new Uint8Array([1])])), seq: 1 }
		)
		const got = await new BaileysStoreClient(nc, opts).getKeys('app-state-sync-version', ['a', 'b', 'c', 'd', 'e'])
		assert.deepEqual(Object.keys(got).sort(), ['a', 'b', 'c', 'd', 'e'])
		assert.deepEqual(sent.map((s) => s.body.ids.length), [5, 3, 2, 2, 1])
		const one = fakeNats([{ error: 413 }])
		await rejectsWith(new BaileysStoreClient(one.nc, opts).getKeys('session', ['a.0']), 413)
	})

	it('splits large gets and sends no request for nothing', async () => {
		const { nc, sent } = fakeNats((s) => ({ values: Object.fromEntries(s.body.ids.map((id: string) => [id, new Uint8Array([1])])), seq: 1 }))
		const store = new BaileysStoreClient(nc, { ...opts, maxIdsPerGet: 2 })
		assert.deepEqual(await store.getKeys('pre-key', []), {})
		assert.equal(await store.setKeys({ 'pre-key': {} }), undefined)
		assert.equal(sent.length, 0)
		const got = await store.getKeys('pre-key', ['1', '2', '3', '2'])
		assert.deepEqual(Object.keys(got).sort(), ['1', '2', '3'])
		assert.deepEqual(sent.map((s) => s.body.ids), [['1', '2'], ['3']])
	})
})

describe('useNatsAuthState', () => {
	// The plain request path; the writer claim has tests of its own (wire.test.ts, claims.test.ts).
	const opts = { tenant: 'acme', session: 'bot-1', retryDelayMs: 1, maxRetryDelayMs: 2, claim: false }

	it('creates creds when none are stored, and writes nothing until saveCreds', async () => {
		const { nc, sent } = fakeNats([{ creds: null, seq: 0 }])
		const { state } = await useNatsAuthState(nc, opts)
		assert.equal(typeof state.creds.registrationId, 'number')
		assert.ok(Buffer.isBuffer(state.creds.noiseKey.public))
		assert.equal(sent.length, 1)
	})

	it('saveCreds writes the creds as they were when called, in call order', async () => {
		let release!: () => void
		const gate = new Promise<void>((r) => (release = r))
		const { nc, sent } = fakeNats(async (s) => {
			if (s.subject.endsWith('creds.get')) return { creds: null, seq: 0 }
			await gate // hold the first write until both saves were called
			return { seq: 1 }
		})
		const { state, saveCreds } = await useNatsAuthState(nc, opts)
		state.creds.nextPreKeyId = 100
		const first = saveCreds()
		state.creds.nextPreKeyId = 200
		const second = saveCreds()
		state.creds.nextPreKeyId = 300 // never saved
		await new Promise((r) => setTimeout(r, 20))
		assert.equal(sent.filter((s) => s.subject.endsWith('creds.put')).length, 1, 'second write waits for the first')
		release()
		await Promise.all([first, second])
		const puts = sent.filter((s) => s.subject.endsWith('creds.put'))
		assert.deepEqual(puts.map((s) => (decodeValue(s.body.creds) as { nextPreKeyId: number }).nextPreKeyId), [100, 200])
	})

	it('keys.set is one request for many types, null deletes; keys.get returns found ids only', async () => {
		const { nc, sent } = fakeNats([{ creds: null, seq: 0 }, { seq: 3 }, { values: { '1': encodeValue({ public: Buffer.from([1]), private: Buffer.from([2]) }) }, seq: 3 }])
		const { state } = await useNatsAuthState(nc, opts)
		await state.keys.set({ 'pre-key': { 1: { public: Buffer.from([1]), private: Buffer.from([2]) }, 2: null }, 'lid-mapping': { '1555': '999' } })
		assert.equal(sent.length, 2)
		const data = sent[1]!.body.data
		assert.deepEqual(Object.keys(data), ['pre-key', 'lid-mapping'])
		assert.equal(data['pre-key']['2'], null)
		assert.equal(decodeValue(data['lid-mapping']['1555']), '999')
		const got = await state.keys.get('pre-key', ['1', '2'])
		assert.deepEqual(got, { 1: { public: Buffer.from([1]), private: Buffer.from([2]) } })
	})

	it('rejects instead of resolving empty when the store fails', async () => {
		const { nc } = fakeNats([{ creds: null, seq: 0 }, { error: 520 }, { error: 503 }, { error: 503 }])
		const { state } = await useNatsAuthState(nc, { ...opts, retries: 1 })
		await rejectsWith(state.keys.get('session', ['a.0']) as Promise<unknown>, 520)
		await rejectsWith(state.keys.set({ session: { 'a.0': null } }) as Promise<unknown>, 503)
		await rejectsWith(useNatsAuthState(fakeNats([{ error: 520 }]).nc, opts), 520)
	})

	it('clear sends session.delete with a rid', async () => {
		const { nc, sent } = fakeNats([{ creds: null, seq: 0 }, { seq: 9 }])
		const { clear } = await useNatsAuthState(nc, opts)
		await clear()
		assert.equal(sent[1]!.subject, 'bstore.acme.bot-1.session.delete')
		assert.ok(sent[1]!.body.rid)
	})
})


describe('writer claim, against a stand-in for the service', () => {
	const opts = { tenant: 'acme', session: 'bot-1', retryDelayMs: 1, maxRetryDelayMs: 2 }
	const op = (s: Sent) => s.subject.split('.').slice(-2).join('.')
	const token = (v: string) => ({ token: Buffer.from(v) })
	const granted = { claim: 'c1', lease_ms: 60_000, wait_ms: 0, seq: 1 }

	it('a read that was overtaken by the client’s own write never replaces what the write stored', async () => {
		let releaseRead!: () => void
		const readHeld = new Promise<void>((r) => (releaseRead = r))
		let reads = 0
		const { nc, sent } = fakeNats(async (s) => {
			if (op(s) === 'creds.get') return { creds: null, seq: 0 }
			if (op(s) === 'session.claim') return granted
			if (op(s) === 'keys.set') return { seq: 3, lease_ms: 60_000 }
			reads++
			if (reads === 1) return { values: {}, seq: 1 } // the first read, to get the claim going
			await readHeld // the service read K at seq 2, before the write; its reply comes last
			return { values: { K: encodeValue(token('old')) }, seq: 2 }
		})
		const { state, claim } = await useNatsAuthState(nc, opts)
		await state.keys.get('tctoken', ['x'])
		assert.ok(claim!.valid(), 'claimed')
		const read = state.keys.get('tctoken', ['K'])
		await state.keys.set({ tctoken: { K: token('new') } })
		releaseRead()
		assert.deepEqual(await read, { K: token('old') }, 'the read itself answers what the service read')
		const before = sent.length
		assert.deepEqual(await state.keys.get('tctoken', ['K']), { K: token('new') })
		assert.equal(sent.length, before, 'answered from memory')
		claim!.close()
	})

	it('a write whose claim was superseded is sent again without it, with the same rid, and nothing known is kept', async () => {
		let superseded = false
		const { nc, sent } = fakeNats(async (s) => {
			if (op(s) === 'creds.get') return { creds: null, seq: 0 }
			if (op(s) === 'session.claim') return granted
			if (op(s) === 'keys.get') return { values: {}, seq: 1 }
			if (s.body.claim !== undefined && superseded) return { error: 410, message: 'superseded' }
			return s.body.claim !== undefined ? { seq: 2, lease_ms: 60_000 } : { seq: 3 }
		})
		const { state, claim } = await useNatsAuthState(nc, opts)
		await state.keys.get('tctoken', ['x']) // sent while the claim is asked for: not kept
		await state.keys.get('tctoken', ['x']) // sent under the claim: x is known not to be stored
		await state.keys.get('tctoken', ['x'])
		assert.equal(claim!.stats.fromMemory, 1, 'the absence of x was known')
		superseded = true
		await state.keys.set({ tctoken: { K: token('v') } })
		const sets = sent.filter((s) => op(s) === 'keys.set')
		assert.deepEqual(
			sets.map((s) => s.body.claim),
			['c1', undefined]
		)
		assert.equal(sets[0]!.body.rid, sets[1]!.body.rid, 'the same rid')
		assert.equal(claim!.claimId, undefined)
		const before = sent.length
		await state.keys.get('tctoken', ['x'])
		assert.equal(sent.length, before + 1, 'nothing is answered from memory any more')
		claim!.close()
	})

	it('against a service without session.claim, every read is sent and no write carries a claim', async () => {
		const { nc, sent } = fakeNats(async (s) => {
			if (op(s) === 'creds.get') return { creds: null, seq: 0 }
			if (op(s) === 'session.claim') return { error: 404, message: 'unknown op' }
			if (op(s) === 'keys.get') return { values: {}, seq: 1 }
			return { seq: 2 }
		})
		const { state, claim } = await useNatsAuthState(nc, opts)
		for (let i = 0; i < 3; i++) await state.keys.get('tctoken', ['x'])
		await state.keys.set({ tctoken: { K: token('v') } })
		await state.keys.get('tctoken', ['K'])
		assert.deepEqual(
			sent.map(op),
			['creds.get', 'session.claim', 'keys.get', 'keys.get', 'keys.get', 'keys.set', 'keys.get']
		)
		assert.ok(sent.every((s) => s.body.claim === undefined))
		assert.equal(claim!.stats.fromMemory, 0)
	})
})

// The bytes the client puts on the wire, read with a strict MessagePack reader and held
// to the request table of docs/protocol.md: one map with str keys and exactly the
// documented fields, rid and type as str, ids as an array of str, creds and values as
// bin, nil for deletions, creds.get and session.info as an empty map.
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { describe, it } from 'node:test'
import { encode } from '@msgpack/msgpack'
import { BufferJSON, initAuthCreds, type SignalDataSet } from '@whiskeysockets/baileys'
import type { Msg, NatsConnection } from 'nats'
import { BaileysStoreClient, BaileysStoreError, decodeValue, encodeValue, useNatsAuthState } from '../src/index.js'
import { type Node, readStrict, strMap } from './support/msgpack-strict.js'

type Sent = { op: string; bytes: Uint8Array }

/** Records the raw bytes of every request and answers as the service would. */
function recordingNats(stored: { creds?: Uint8Array } = {}, claims = false) {
	const sent: Sent[] = []
	const nc = {
		async request(subject: string, data?: Uint8Array): Promise<Msg> {
			const op = subject.split('.').slice(-2).join('.')
			// A copy: the assertions must see what was sent, not a buffer reused later.
			sent.push({ op, bytes: Uint8Array.from(data ?? new Uint8Array(0)) })
			const claimed = claims && op !== 'session.claim' && strMap(readStrict(data!), op).has('claim')
			const reply =
				op === 'session.claim'
					? claims
						? { claim: 'c0ffee', lease_ms: 60_000, wait_ms: 0, seq: 1 }
						: null
					: claimed
						? { seq: 2, lease_ms: 60_000 }
						: op === 'creds.get'
					? { creds: stored.creds ?? null, seq: 1 }
					: op === 'keys.get'
						? { values: {}, seq: 1 }
						: op === 'session.info'
							? { seq: 1, exists: true, creds: true, keys: {}, bytes: 0, updated_at_ms: null, events: 1 }
							: { seq: 2 }
			if (reply === null) {
				// A service without claims.
				const headers = new Map([['Nats-Service-Error-Code', '404'], ['Nats-Service-Error', 'unknown op']])
				return { data: new Uint8Array(0), headers: { get: (k: string) => headers.get(k) ?? '' } } as unknown as Msg
			}
			return { data: encode(reply), headers: undefined } as unknown as Msg
		}
	}
	return { nc: nc as unknown as NatsConnection, sent }
}

const RID = /^[A-Za-z0-9_-]{1,64}$/
const FIELDS: Record<string, { required: string[]; optional: string[] }> = {
	'creds.get': { required: [], optional: [] },
	'session.info': { required: [], optional: [] },
	'creds.put': { required: ['creds'], optional: ['rid', 'claim'] },
	'keys.get': { required: ['type', 'ids'], optional: [] },
	'keys.set': { required: ['data'], optional: ['rid', 'claim'] },
	'session.delete': { required: [], optional: ['rid', 'claim'] },
	'session.claim': { required: [], optional: ['claim'] }
}

function str(node: Node | undefined, path: string): string {
	assert.equal(node?.t, 'str', `${path} is ${node?.t}, not str`)
	return (node as { v: string }).v
}

function bin(node: Node | undefined, path: string): Uint8Array {
	assert.equal(node?.t, 'bin', `${path} is ${node?.t}, not bin`)
	return (node as { v: Uint8Array }).v
}

interface Body {
	rid?: string
	claim?: string
	creds?: Uint8Array
	type?: string
	ids?: string[]
	data?: Map<string, Map<string, Uint8Array | null>>
}

/** Checks one request body as a strict decoder of the protocol would, and gives its fields back. */
function checkBody(op: string, bytes: Uint8Array): Body {
	const fields = FIELDS[op]
	assert.ok(fields, `unknown op ${op}`)
	// An empty body is the same as an empty map, and only ops without fields may send one.
	if (bytes.byteLength === 0) {
		assert.deepEqual(fields.required, [], `${op} sent an empty body`)
		return {}
	}
	const top = strMap(readStrict(bytes), op)
	const keys = [...top.keys()]
	for (const k of fields.required) assert.ok(top.has(k), `${op} lacks ${k}`)
	for (const k of keys) assert.ok(fields.required.includes(k) || fields.optional.includes(k), `${op} sends the undocumented field ${k}`)
	const body: Body = {}
	if (top.has('rid')) {
		body.rid = str(top.get('rid'), `${op}.rid`)
		assert.match(body.rid, RID)
	}
	if (top.has('claim')) {
		body.claim = str(top.get('claim'), `${op}.claim`)
		assert.match(body.claim, RID)
	}
	if (top.has('creds')) body.creds = bin(top.get('creds'), `${op}.creds`)
	if (top.has('type')) body.type = str(top.get('type'), `${op}.type`)
	if (top.has('ids')) {
		const ids = top.get('ids')!
		assert.equal(ids.t, 'array', `${op}.ids is ${ids.t}, not array`)
		body.ids = (ids as { v: Node[] }).v.map((id, i) => str(id, `${op}.ids[${i}]`))
	}
	if (top.has('data')) {
		body.data = new Map()
		for (const [type, values] of strMap(top.get('data')!, `${op}.data`)) {
			const out = new Map<string, Uint8Array | null>()
			for (const [id, value] of strMap(values, `${op}.data.${type}`)) {
				out.set(id, value.t === 'nil' ? null : bin(value, `${op}.data.${type}.${id}`))
			}
			body.data.set(type, out)
		}
	}
	return body
}

const opts = { tenant: 'acme', session: 'bot-1' }

const bodiesOf = (sent: Sent[]) => sent.map((s) => checkBody(s.op, s.bytes))

describe('strict reader (the test instrument)', () => {
	it('tells str from bin, sees key types and refuses trailing bytes', () => {
		const node = readStrict(encode({ s: 'x', b: new Uint8Array([1]), n: null }))
		const m = strMap(node, '$')
		assert.deepEqual([m.get('s')?.t, m.get('b')?.t, m.get('n')?.t], ['str', 'bin', 'nil'])
		assert.throws(() => strMap(readStrict(Uint8Array.from([0x81, 0x01, 0xa1, 0x78])), '$'), /int key/) // { 1: 'x' }
		assert.throws(() => readStrict(Uint8Array.from([...encode({}), 0xc0])), /after the value/)
		assert.throws(() => readStrict(Uint8Array.from([0x81, 0xa1, 0x61])), /truncated/)
	})
})

describe('what the client sends', () => {
	it('each op of the request layer is one map of the documented shape', async () => {
		const { nc, sent } = recordingNats()
		const store = new BaileysStoreClient(nc, opts)
		const creds = randomBytes(700)
		const pooled = Buffer.from('xxhello').subarray(2) // a view with a byteOffset
		await store.getCreds()
		await store.info()
		await store.putCreds(creds)
		await store.getKeys('pre-key', ['1', '2', '812'])
		await store.setKeys({
			'pre-key': { '1': randomBytes(84), '2': null },
			session: { '100000000000002_1.1': new Uint8Array([1, 2, 3]), 'gone.0': undefined as unknown as null },
			'identity-key': { a: pooled, empty: Buffer.alloc(0) },
			'lid-mapping': {}
		})
		await store.deleteSession()
		assert.deepEqual(
			sent.map((s) => s.op),
			['creds.get', 'session.info', 'creds.put', 'keys.get', 'keys.set', 'session.delete']
		)
		const [get, info, put, keysGet, keysSet, del] = sent.map((s) => checkBody(s.op, s.bytes))

		assert.deepEqual(get, {})
		assert.deepEqual(info, {})
		assert.deepEqual(put!.creds, new Uint8Array(creds))
		assert.ok(put!.rid)
		assert.deepEqual(keysGet, { type: 'pre-key', ids: ['1', '2', '812'] })
		assert.ok(keysSet!.rid && del!.rid)
		const data = keysSet!.data!
		// An empty type is left out; an undefined value is a deletion, sent as nil.
		assert.deepEqual([...data.keys()], ['pre-key', 'session', 'identity-key'])
		assert.equal(data.get('pre-key')!.get('2'), null)
		assert.equal(data.get('session')!.get('gone.0'), null)
		assert.deepEqual(data.get('session')!.get('100000000000002_1.1'), new Uint8Array([1, 2, 3]))
		assert.deepEqual(data.get('identity-key')!.get('a'), new Uint8Array(Buffer.from('hello')))
		assert.deepEqual(data.get('identity-key')!.get('empty'), new Uint8Array(0))
	})

	it('Baileys traffic through useNatsAuthState stays within the protocol', async () => {
		const stored = initAuthCreds()
		// A service without claims: the first read asks for one, is told 404, and never asks again.
		const { nc, sent: all } = recordingNats({ creds: encodeValue(stored) })
		const { state, saveCreds, clear, store } = await useNatsAuthState(nc, opts)
		const data: SignalDataSet = {
			'pre-key': Object.fromEntries(Array.from({ length: 30 }, (_, i) => [String(i + 1), { public: randomBytes(32), private: randomBytes(32) }])),
			session: { '100000000000002_1.1': { _sessions: { [randomBytes(33).toString('base64')]: { registrationId: 1 } }, version: 'v1' } as never },
			'sender-key': { '120363000000000001@g.us::100000000000001::1': Buffer.from('[]') },
			'sender-key-memory': { '120363000000000001@g.us': { '100000000000002:1@lid': true } },
			'app-state-sync-key': { AAAAAFEx: { keyData: randomBytes(32), fingerprint: { rawId: 1, currentIndex: 0, deviceIndexes: [0] }, timestamp: 1 } as never },
			'lid-mapping': { '15550001001': '100000000000001' },
			'device-list': { '100000000000001': ['0', '1'] },
			tctoken: { '100000000000002@lid': { token: randomBytes(20), timestamp: '1700000000' } },
			'identity-key': { '100000000000002_1.1': randomBytes(33) }
		}
		await state.keys.set(data)
		await state.keys.set({ 'pre-key': { '1': null, '2': undefined as never }, session: { '100000000000002_1.1': null } })
		await state.keys.get('pre-key', ['3', '4'])
		await state.keys.get('session', ['100000000000002_1.1'])
		state.creds.me = { id: '15550001001:1@s.whatsapp.net', name: 'Bot' }
		await saveCreds()
		await store.info()
		await clear()

		const asked = all.filter((s) => s.op === 'session.claim')
		assert.equal(asked.length, 1, 'one claim request, answered 404: no more')
		assert.deepEqual(checkBody('session.claim', asked[0]!.bytes), {})
		const sent = all.filter((s) => s.op !== 'session.claim')
		assert.ok(bodiesOf(sent).every((b) => b.claim === undefined), 'no claim on any write')
		assert.deepEqual(
			sent.map((s) => s.op),
			['creds.get', 'keys.set', 'keys.set', 'keys.get', 'keys.get', 'creds.put', 'session.info', 'session.delete']
		)
		const bodies = sent.map((s) => checkBody(s.op, s.bytes))
		const rids = bodies.filter((b) => b.rid).map((b) => b.rid)
		assert.equal(new Set(rids).size, 4, 'one fresh rid per write')

		// Every value is bin, and decodes to what Baileys' own file store would give back.
		const first = bodies[1]!.data!
		assert.deepEqual([...first.keys()], Object.keys(data))
		for (const [type, values] of first) {
			for (const [id, bytes] of values) {
				assert.ok(bytes, `${type}/${id} is a value, not a deletion`)
				const expected = JSON.parse(JSON.stringify((data as Record<string, Record<string, unknown>>)[type]![id], BufferJSON.replacer), BufferJSON.reviver)
				assert.deepStrictEqual(decodeValue(bytes), expected, `${type}/${id}`)
			}
		}
		const deletions = bodies[2]!.data!
		assert.deepEqual([...deletions.get('pre-key')!], [['1', null], ['2', null]])
		assert.deepEqual([...deletions.get('session')!], [['100000000000002_1.1', null]])
		assert.deepEqual(bodies[3], { type: 'pre-key', ids: ['3', '4'] })
		assert.equal((decodeValue(bodies[5]!.creds!) as { me: { name: string } }).me.name, 'Bot')
	})

	it('with a claim, writes carry it and reads known from them are not sent', async () => {
		const { nc, sent } = recordingNats({ creds: encodeValue(initAuthCreds()) }, true)
		const { state, saveCreds, clear, claim } = await useNatsAuthState(nc, opts)
		await state.keys.get('tctoken', ['a@lid', 'b@lid'])
		await state.keys.set({ tctoken: { 'a@lid': { token: randomBytes(20) } }, 'device-list': { u1: ['0'] } })
		// a@lid and u1 are known from the write; b@lid was asked for before the claim was granted, so it is asked again.
		assert.deepEqual(Object.keys(await state.keys.get('tctoken', ['a@lid', 'b@lid'])), ['a@lid'])
		// Now b@lid is known not to be stored: nothing goes out.
		assert.deepEqual(Object.keys(await state.keys.get('tctoken', ['a@lid', 'b@lid'])), ['a@lid'])
		assert.deepEqual(await state.keys.get('device-list', ['u1']), { u1: ['0'] })
		// Only the unknown id goes out.
		await state.keys.get('tctoken', ['a@lid', 'c@lid'])
		await saveCreds()
		await clear()
		const bodies = bodiesOf(sent)
		assert.deepEqual(
			sent.map((s) => s.op),
			['creds.get', 'session.claim', 'keys.get', 'keys.set', 'keys.get', 'keys.get', 'creds.put', 'session.delete']
		)
		assert.deepEqual(bodies[1], {})
		assert.deepEqual(bodies[4], { type: 'tctoken', ids: ['b@lid'] })
		assert.deepEqual(bodies[5], { type: 'tctoken', ids: ['c@lid'] })
		for (const i of [3, 6, 7]) assert.equal(bodies[i]!.claim, 'c0ffee', `${sent[i]!.op} carries the claim`)
		for (const i of [2, 4, 5]) assert.equal(bodies[i]!.claim, undefined, 'reads carry no claim')
		assert.equal(claim?.stats.fromMemory, 2)
		claim?.close()
	})

	it('refuses ids that are not strings and values that are not bytes, before sending', async () => {
		const { nc, sent } = recordingNats()
		const store = new BaileysStoreClient(nc, opts)
		const refused = async (p: Promise<unknown>, code: string) => {
			await assert.rejects(p, (err: unknown) => err instanceof BaileysStoreError && err.code === code)
		}
		await refused(store.getKeys('pre-key', [1 as unknown as string]), 'INVALID_ID')
		await refused(store.getKeys(5 as unknown as string, ['1']), 'INVALID_ID')
		await refused(store.getKeys('pre-key', '1' as unknown as string[]), 'INVALID_ID')
		await refused(store.setKeys({ 'pre-key': { '1': 'text' as unknown as Uint8Array } }), 'INVALID_VALUE')
		await refused(store.setKeys({ 'pre-key': { '1': [1, 2] as unknown as Uint8Array } }), 'INVALID_VALUE')
		await refused(store.putCreds('{"creds":1}' as unknown as Uint8Array), 'INVALID_VALUE')
		await refused(store.putCreds(null as unknown as Uint8Array), 'INVALID_VALUE')
		assert.equal(sent.length, 0)
	})
})

import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { describe, it } from 'node:test'
import { encode } from '@msgpack/msgpack'
import { BufferJSON, initAuthCreds, proto } from '@whiskeysockets/baileys'
import { decodeValue, encodeValue } from '../src/codec.js'

/** What Baileys' own file store gives back for `value`. */
const viaBufferJSON = (value: unknown): unknown => JSON.parse(JSON.stringify(value, BufferJSON.replacer), BufferJSON.reviver)
const viaMsgpack = (value: unknown): unknown => decodeValue(encodeValue(value))

function assertSameAsBufferJSON(value: unknown): unknown {
	const expected = viaBufferJSON(value)
	const actual = viaMsgpack(value)
	// deepStrictEqual compares prototypes too: a Uint8Array where a Buffer is expected fails.
	assert.deepStrictEqual(actual, expected)
	assertNoBareUint8Array(actual)
	return actual
}

function assertNoBareUint8Array(value: unknown, path = '$'): void {
	if (value instanceof Uint8Array) {
		assert.ok(Buffer.isBuffer(value), `${path} is a Uint8Array, not a Buffer`)
		return
	}
	if (value !== null && typeof value === 'object') {
		const proto = Object.getPrototypeOf(value)
		assert.ok(proto === Object.prototype || proto === Array.prototype, `${path} is not a plain object or array`)
		for (const [k, v] of Object.entries(value)) assertNoBareUint8Array(v, `${path}.${k}`)
	}
}

describe('value codec', () => {
	it('round-trips scalars like JSON', () => {
		for (const v of ['', 'héllo ✓ 😀', 0, -0, 1, -1, 255, 65536, 2 ** 31, 2 ** 53 - 1, -(2 ** 40), 1.5, -3.25e-7, true, false, null]) {
			assertSameAsBufferJSON(v)
		}
	})

	it('turns non-finite numbers into null, as JSON does', () => {
		assert.deepStrictEqual(viaMsgpack({ a: NaN, b: Infinity, c: [-Infinity] }), { a: null, b: null, c: [null] })
		assertSameAsBufferJSON({ a: NaN, b: Infinity, c: [-Infinity] })
	})

	it('gives every binary back as a Buffer, at any depth', () => {
		const value = {
			buf: randomBytes(32),
			u8: new Uint8Array([1, 2, 3]),
			sub: Buffer.from('abcdef').subarray(2, 4),
			empty: Buffer.alloc(0),
			list: [randomBytes(3), new Uint8Array(0), { inner: [[randomBytes(64)]] }],
			big: randomBytes(300_000)
		}
		const out = assertSameAsBufferJSON(value) as typeof value
		assert.ok(Buffer.isBuffer(out.u8))
		assert.deepStrictEqual([...out.sub], [...Buffer.from('cd')])
	})

	it('drops undefined properties and writes null for undefined array items', () => {
		const out = assertSameAsBufferJSON({ a: undefined, b: 1, c: [undefined, 2, () => 1], f: () => 1, s: Symbol('x') })
		assert.deepStrictEqual(out, { b: 1, c: [null, 2, null] })
		assert.ok(!Object.hasOwn(out as object, 'a'))
	})

	it('keeps empty objects and arrays, and key order', () => {
		const out = assertSameAsBufferJSON({ z: {}, y: [], x: { b: 1, a: 2 } })
		assert.deepStrictEqual(Object.keys(out as object), ['z', 'y', 'x'])
	})

	it('nests deeply', () => {
		let deep: unknown = { leaf: randomBytes(4), s: 'x' }
		for (let i = 0; i < 1000; i++) deep = i % 2 ? { level: i, next: deep } : [i, deep, 'pad']
		assertSameAsBufferJSON(deep)
	})

	it('follows toJSON, as JSON does (Date, protobuf messages)', () => {
		const when = new Date(1_700_000_000_123)
		assertSameAsBufferJSON({ when })
		assert.deepStrictEqual(viaMsgpack({ when }), { when: when.toISOString() })
		// creds.account is a decoded protobuf message; JSON keeps its toJSON form (bytes as base64).
		const account = proto.ADVSignedDeviceIdentity.decode(
			proto.ADVSignedDeviceIdentity.encode({
				details: randomBytes(40),
				accountSignatureKey: randomBytes(32),
				accountSignature: randomBytes(64),
				deviceSignature: randomBytes(64)
			}).finish()
		)
		const out = assertSameAsBufferJSON({ account }) as { account: Record<string, unknown> }
		assert.equal(typeof out.account.details, 'string')
	})

	it('mirrors the reviver: objects shaped like serialized buffers become Buffers', () => {
		assertSameAsBufferJSON({ legacy: { 0: 1, 1: 2, 2: 255 } })
		assertSameAsBufferJSON({ json: { type: 'Buffer', data: [1, 2, 3] } })
		assertSameAsBufferJSON({ typed: new Uint16Array([1, 2, 513]) })
		assertSameAsBufferJSON({ notBytes: { 0: 'a', 1: 2 } })
		assert.ok(Buffer.isBuffer((viaMsgpack({ legacy: { 0: 1 } }) as { legacy: unknown }).legacy))
	})

	it('round-trips Baileys creds', () => {
		const creds = initAuthCreds()
		const out = assertSameAsBufferJSON({
			...creds,
			me: { id: '15550001111:3@s.whatsapp.net', lid: '123456789:3@lid', name: 'Bot' },
			signalIdentities: [{ identifier: { name: '123456789:3@lid', deviceId: 0 }, identifierKey: randomBytes(33) }],
			routingInfo: randomBytes(12),
			processedHistoryMessages: [{ key: { remoteJid: 'a@s.whatsapp.net', id: 'X', fromMe: true }, messageTimestamp: 1700000000 }],
			additionalData: { nested: { deep: [1, 'two', { three: randomBytes(3) }] } }
		}) as typeof creds
		assert.ok(Buffer.isBuffer(out.noiseKey.private))
		assert.ok(Buffer.isBuffer(out.signedPreKey.signature))
	})

	it('round-trips every v7 key type', () => {
		const values: Record<string, unknown> = {
			'pre-key': { public: randomBytes(32), private: randomBytes(32) },
			session: {
				_sessions: { [randomBytes(33).toString('base64')]: { registrationId: 42, currentRatchet: { rootKey: 'AAAA', previousCounter: 0 }, chains: {} } },
				version: 'v1'
			},
			'sender-key': Buffer.from(JSON.stringify([{ senderKeyId: 1, senderChainKey: { iteration: 3, seed: 'c2VlZA==' } }])),
			'sender-key-memory': { '123@lid': true, '456:2@lid': true },
			'app-state-sync-key': { keyData: randomBytes(32), fingerprint: { rawId: 7, currentIndex: 1, deviceIndexes: [0, 1] }, timestamp: 1700000000 },
			'app-state-sync-version': { version: 12, hash: randomBytes(128), indexValueMap: { [randomBytes(32).toString('base64')]: { valueMac: randomBytes(32) } } },
			'lid-mapping': '123456789',
			'device-list': ['0', '1', '27'],
			tctoken: { token: randomBytes(20), timestamp: '1700000000' },
			'identity-key': randomBytes(33)
		}
		for (const value of Object.values(values)) assertSameAsBufferJSON(value)
	})

	it('writes the bytes @msgpack/msgpack writes for the JSON round trip, for random values', () => {
		// A seeded generator: the same values on every run.
		let seed = 0x2545f491
		const rand = (n: number) => {
			seed ^= seed << 13
			seed ^= seed >>> 17
			seed ^= seed << 5
			return (seed >>> 0) % n
		}
		const pick = <T>(xs: readonly T[]): T => xs[rand(xs.length)]!
		const numbers = [0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, 2 ** 60, -1, -32, -33, -128, -129, -32768, -32769]
		const moreNumbers = [-(2 ** 31), -(2 ** 31) - 1, -(2 ** 53 - 1), 1.5, -0.25, 1e300, NaN, Infinity, -Infinity, -0]
		const text = (n: number, chars: string) => Array.from({ length: n }, () => pick([...chars])).join('')
		const strings = () =>
			pick([
				'',
				text(rand(40), 'abcXYZ019+/=@.:_-'),
				text(pick([31, 32, 63, 64, 65, 255, 256, 300, rand(200) ? 1000 : 70_000]), 'abAB09'),
				text(rand(80), 'aé✓😀\u0000\u007f\u0080'),
				text(pick([31, 32, 255, 256]), 'é')
			])
		const leaf = (): unknown =>
			pick([
				() => pick([...numbers, ...moreNumbers]),
				strings,
				() => pick([true, false, null]),
				() => randomBytes(rand(200) ? pick([0, 1, 31, 255, 256]) : pick([65535, 65536])),
				() => new Uint8Array(randomBytes(rand(20))),
				() => new Date(1_700_000_000_000 + rand(1e9)),
				() => ({ type: 'Buffer', data: Array.from({ length: rand(5) }, () => rand(256)) }),
				() => Object.fromEntries(Array.from({ length: 1 + rand(4) }, (_, i) => [String(i), rand(256)])),
				() => ({ toJSON: (key: string) => `toJSON of ${key}` })
			])()
		const value = (depth: number): unknown => {
			if (depth > 3 || rand(3) === 0) return leaf()
			if (rand(2)) return Array.from({ length: depth > 1 ? pick([0, 1, 2]) : pick([0, 1, 2, 15, 16, 17]) }, () => (rand(8) ? value(depth + 1) : undefined))
			const n = depth > 1 ? pick([0, 1, 3]) : pick([0, 1, 3, 15, 16, 17, 40])
			const obj: Record<string, unknown> = {}
			// Left-out properties only where the map header cannot shrink past a size class (15 or fewer keys).
			for (let i = 0; i < n; i++) obj[pick([`k${i}`, `${i}x`, String(i), strings() + i])] = n < 16 && rand(8) === 0 ? pick([undefined, () => 1]) : value(depth + 1)
			return obj
		}
		for (let i = 0; i < 200; i++) {
			const v = value(0)
			const bytes = encodeValue(v)
			assert.deepStrictEqual(Buffer.from(bytes), Buffer.from(encode(viaBufferJSON(v) ?? null)), `value ${i}`)
			assertSameAsBufferJSON(v)
		}
	})

	it('leaves out properties of a large object and still counts the rest right', () => {
		const obj: Record<string, unknown> = {}
		for (let i = 0; i < 20; i++) obj[`k${i}`] = i % 3 ? i : undefined
		assertSameAsBufferJSON(obj)
		const big: Record<string, unknown> = {}
		for (let i = 0; i < 70_000; i++) big[`k${i}`] = i < 10 ? i : undefined
		assertSameAsBufferJSON(big)
		assertSameAsBufferJSON([obj, big, { a: undefined }])
	})

	it('refuses a BigInt like JSON does', () => {
		assert.throws(() => encodeValue({ n: 1n }), TypeError)
	})
})

import { Decoder, Encoder } from '@msgpack/msgpack'

/**
 * Values and creds are opaque bytes to the service; the client turns them into
 * MessagePack. Baileys' own stores write `JSON.stringify(value, BufferJSON.replacer)`
 * and read `JSON.parse(text, BufferJSON.reviver)`, and Baileys is only ever run
 * against what that round trip gives back. So encoding follows JSON's rules
 * (toJSON, dropped undefined, null for holes in arrays, the reviver's quirks),
 * except that bytes travel as MessagePack `bin` instead of base64 text.
 */

type Plain = null | boolean | number | string | Uint8Array | Plain[] | { [key: string]: Plain }

// Values nest as deep as the caller makes them, as with JSON.
const encoder = new Encoder({ maxDepth: Number.MAX_SAFE_INTEGER })
const decoder = new Decoder()

/** Encode one key value or the creds object. */
export function encodeValue(value: unknown): Uint8Array {
	const plain = toPlain(value, '', false)
	return encoder.encode(plain === undefined ? null : plain)
}

/** Decode bytes written by {@link encodeValue}: every binary comes back as a Node Buffer. */
export function decodeValue(bytes: Uint8Array): unknown {
	return toBuffers(decoder.decode(bytes))
}

/**
 * What `JSON.parse(JSON.stringify(value, BufferJSON.replacer), BufferJSON.reviver)`
 * would give, with bytes left as bytes. `undefined` means "left out" (as JSON
 * leaves out the property).
 */
function toPlain(value: unknown, key: string, inArray: boolean): Plain | undefined {
	if (value !== null && typeof value === 'object' && !(value instanceof Uint8Array)) {
		const toJSON = (value as { toJSON?: unknown }).toJSON
		// e.g. Date -> ISO string, protobuf messages -> their JSON form (bytes as base64, longs as strings).
		if (typeof toJSON === 'function') value = toJSON.call(value, key)
	}
	// JSON would write bytes through Buffer#toJSON and BufferJSON revives them as a Buffer: keep them as bytes.
	if (value instanceof Uint8Array) return value
	switch (typeof value) {
		case 'string':
		case 'boolean':
			return value
		case 'number':
			return Number.isFinite(value) ? value : null
		case 'bigint':
			throw new TypeError('Do not know how to serialize a BigInt')
		case 'undefined':
		case 'function':
		case 'symbol':
			return inArray ? null : undefined
	}
	if (value === null) return null
	// BufferJSON.replacer: anything shaped like a serialized Buffer is a Buffer.
	const obj = value as Record<string, unknown>
	if (obj.type === 'Buffer') {
		return Buffer.from((obj.data || obj) as string)
	}
	if (Array.isArray(value)) {
		return value.map((item, i) => toPlain(item, String(i), true) as Plain)
	}
	const out: Record<string, Plain> = {}
	const keys = Object.keys(obj)
	for (const k of keys) {
		const v = toPlain(obj[k], k, false)
		if (v !== undefined) out[k] = v
	}
	// BufferJSON.reviver: a non-empty object whose keys all parse as integers and whose
	// values are all numbers comes back as a Buffer of those numbers (this is how
	// Uint8Array-like objects were written by older Baileys versions).
	const outKeys = Object.keys(out)
	if (outKeys.length > 0 && outKeys.every((k) => !isNaN(parseInt(k, 10)))) {
		const values = Object.values(out)
		if (values.every((v) => typeof v === 'number')) return Buffer.from(values as number[])
	}
	return out
}

/** The decoder gives Uint8Array views into the reply; Baileys wants Buffers it owns. */
function toBuffers(value: unknown): unknown {
	if (value instanceof Uint8Array) return Buffer.from(value)
	if (Array.isArray(value)) {
		for (let i = 0; i < value.length; i++) value[i] = toBuffers(value[i])
	} else if (value !== null && typeof value === 'object') {
		const obj = value as Record<string, unknown>
		for (const k of Object.keys(obj)) obj[k] = toBuffers(obj[k])
	}
	return value
}

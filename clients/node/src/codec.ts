import { Decoder } from '@msgpack/msgpack'

/**
 * Values and creds are opaque bytes to the service; the client turns them into
 * MessagePack. Baileys' own stores write `JSON.stringify(value, BufferJSON.replacer)`
 * and read `JSON.parse(text, BufferJSON.reviver)`, and Baileys is only ever run
 * against what that round trip gives back. So encoding follows JSON's rules
 * (toJSON, dropped undefined, null for holes in arrays, the reviver's quirks),
 * except that bytes travel as MessagePack `bin` instead of base64 text.
 */

const decoder = new Decoder()

/** Encode one key value or the creds object. */
export function encodeValue(value: unknown): Uint8Array {
	// A toJSON that encodes a value itself would find the shared writer busy: it gets one of its own.
	if (writer.busy) return new ValueWriter().encode(value)
	return writer.encode(value)
}

/** Decode bytes written by {@link encodeValue}: every binary comes back as a Node Buffer. */
export function decodeValue(bytes: Uint8Array): unknown {
	return toBuffers(decoder.decode(bytes))
}

/** What {@link ValueWriter.value} wrote: nothing (JSON leaves the property out), a number, or anything else. */
const LEFT_OUT = 0
const WROTE = 1
const NUMBER = 2

/**
 * Writes MessagePack straight from the value, in one walk, with JSON's rules: what
 * `JSON.parse(JSON.stringify(value, BufferJSON.replacer), BufferJSON.reviver)` would give, with
 * bytes left as bytes. No copy of the value is made on the way; the bytes are written into one
 * buffer kept from call to call, and the result is a copy of them.
 */
class ValueWriter {
	busy = false
	private bytes = new Uint8Array(4096)
	private view = new DataView(this.bytes.buffer)
	/** The same memory, for Buffer's native UTF-8 writer. */
	private buffer = Buffer.from(this.bytes.buffer)
	private pos = 0
	/** The number the last value() that returned NUMBER wrote. */
	private num = 0

	encode(value: unknown): Uint8Array {
		this.busy = true
		try {
			this.pos = 0
			if (this.value(value, '', false) === LEFT_OUT) this.byte(0xc0) // a bare undefined: null
			return this.bytes.slice(0, this.pos)
		} finally {
			this.busy = false
			// One huge value does not keep its buffer for good.
			if (this.bytes.length > 1024 * 1024) this.allocate(4096)
		}
	}

	private value(value: unknown, key: string | number, inArray: boolean): number {
		if (value !== null && typeof value === 'object' && !(value instanceof Uint8Array)) {
			const toJSON = (value as { toJSON?: unknown }).toJSON
			// e.g. Date -> ISO string, protobuf messages -> their JSON form (bytes as base64, longs as strings).
			if (typeof toJSON === 'function') value = toJSON.call(value, typeof key === 'number' ? String(key) : key)
		}
		switch (typeof value) {
			case 'string':
				this.string(value)
				return WROTE
			case 'number':
				if (!Number.isFinite(value)) {
					this.byte(0xc0)
					return WROTE
				}
				this.number(value)
				this.num = value
				return NUMBER
			case 'boolean':
				this.byte(value ? 0xc3 : 0xc2)
				return WROTE
			case 'bigint':
				throw new TypeError('Do not know how to serialize a BigInt')
			case 'undefined':
			case 'function':
			case 'symbol':
				if (!inArray) return LEFT_OUT
				this.byte(0xc0)
				return WROTE
		}
		if (value === null) {
			this.byte(0xc0)
			return WROTE
		}
		// JSON would write bytes through Buffer#toJSON and BufferJSON revives them as a Buffer: keep them as bytes.
		if (value instanceof Uint8Array) {
			this.binary(value)
			return WROTE
		}
		const obj = value as Record<string, unknown>
		// BufferJSON.replacer: anything shaped like a serialized Buffer is a Buffer.
		if (obj.type === 'Buffer') {
			this.binary(Buffer.from((obj.data || obj) as string))
			return WROTE
		}
		if (Array.isArray(value)) this.array(value)
		else this.map(obj)
		return WROTE
	}

	private array(items: unknown[]): void {
		const n = items.length
		this.header(n, 0x90, 0xdc, 0xdd)
		for (let i = 0; i < n; i++) this.value(items[i], i, true)
	}

	private map(obj: Record<string, unknown>): void {
		const keys = Object.keys(obj)
		const start = this.pos
		// The count is known once the left-out properties are: room for the header the key count needs, filled in after.
		const room = keys.length < 16 ? 1 : keys.length < 0x10000 ? 3 : 5
		this.ensure(room)
		this.pos += room
		let kept = 0
		// BufferJSON.reviver: a non-empty object whose keys all parse as integers and whose values
		// are all numbers comes back as a Buffer of those numbers (this is how Uint8Array-like
		// objects were written by older Baileys versions). Followed while it may still hold.
		let bytesLike = true
		let numbers: number[] | undefined
		for (const k of keys) {
			const at = this.pos
			this.string(k)
			const wrote = this.value(obj[k], k, false)
			if (wrote === LEFT_OUT) {
				this.pos = at
				continue
			}
			kept++
			if (bytesLike) {
				if (wrote === NUMBER && !isNaN(parseInt(k, 10))) (numbers ??= []).push(this.num)
				else bytesLike = false
			}
		}
		if (bytesLike && numbers) {
			this.pos = start
			this.binary(Buffer.from(numbers))
			return
		}
		const bytes = this.bytes
		if (room === 1) {
			bytes[start] = 0x80 | kept
		} else if (room === 3) {
			bytes[start] = 0xde
			this.view.setUint16(start + 1, kept)
		} else {
			bytes[start] = 0xdf
			this.view.setUint32(start + 1, kept)
		}
	}

	/** fixarray/fixmap, 16 or 32: `fix` is the fixed type's tag. */
	private header(n: number, fix: number, tag16: number, tag32: number): void {
		this.ensure(5)
		if (n < 16) {
			this.bytes[this.pos++] = fix | n
		} else if (n < 0x10000) {
			this.bytes[this.pos] = tag16
			this.view.setUint16(this.pos + 1, n)
			this.pos += 3
		} else {
			this.bytes[this.pos] = tag32
			this.view.setUint32(this.pos + 1, n)
			this.pos += 5
		}
	}

	private string(s: string): void {
		const len = s.length
		if (len < 64) {
			// Short strings (keys, JIDs, base64 of keys) are nearly always ASCII: written as they are read.
			this.ensure(2 + len)
			const start = this.pos
			const bytes = this.bytes
			let p = start + this.stringHeader(len)
			for (let i = 0; i < len; i++) {
				const c = s.charCodeAt(i)
				if (c >= 0x80) {
					this.pos = start
					this.longString(s)
					return
				}
				bytes[p++] = c
			}
			this.pos = p
			return
		}
		this.longString(s)
	}

	private longString(s: string): void {
		const size = Buffer.byteLength(s)
		this.ensure(5 + size)
		this.pos += this.stringHeader(size)
		this.pos += this.buffer.write(s, this.pos, size, 'utf8')
	}

	/** Writes the header of a str of `size` bytes at pos (room for it ensured) and gives its length; pos stays. */
	private stringHeader(size: number): number {
		const bytes = this.bytes
		const p = this.pos
		if (size < 32) {
			bytes[p] = 0xa0 | size
			return 1
		}
		if (size < 0x100) {
			bytes[p] = 0xd9
			bytes[p + 1] = size
			return 2
		}
		if (size < 0x10000) {
			bytes[p] = 0xda
			this.view.setUint16(p + 1, size)
			return 3
		}
		bytes[p] = 0xdb
		this.view.setUint32(p + 1, size)
		return 5
	}

	private binary(data: Uint8Array): void {
		const size = data.byteLength
		this.ensure(5 + size)
		const bytes = this.bytes
		const p = this.pos
		if (size < 0x100) {
			bytes[p] = 0xc4
			bytes[p + 1] = size
			this.pos += 2
		} else if (size < 0x10000) {
			bytes[p] = 0xc5
			this.view.setUint16(p + 1, size)
			this.pos += 3
		} else {
			bytes[p] = 0xc6
			this.view.setUint32(p + 1, size)
			this.pos += 5
		}
		bytes.set(data, this.pos)
		this.pos += size
	}

	/** As @msgpack/msgpack writes numbers: the smallest int that holds a safe integer, float 64 for the rest. */
	private number(n: number): void {
		this.ensure(9)
		const bytes = this.bytes
		const view = this.view
		const p = this.pos
		if (!Number.isSafeInteger(n)) {
			bytes[p] = 0xcb
			view.setFloat64(p + 1, n)
			this.pos += 9
		} else if (n >= 0) {
			if (n < 0x80) {
				bytes[p] = n
				this.pos += 1
			} else if (n < 0x100) {
				bytes[p] = 0xcc
				bytes[p + 1] = n
				this.pos += 2
			} else if (n < 0x10000) {
				bytes[p] = 0xcd
				view.setUint16(p + 1, n)
				this.pos += 3
			} else if (n < 0x100000000) {
				bytes[p] = 0xce
				view.setUint32(p + 1, n)
				this.pos += 5
			} else {
				bytes[p] = 0xcf
				view.setUint32(p + 1, Math.floor(n / 0x100000000))
				view.setUint32(p + 5, n >>> 0)
				this.pos += 9
			}
		} else if (n >= -0x20) {
			bytes[p] = 0xe0 | (n + 0x20)
			this.pos += 1
		} else if (n >= -0x80) {
			bytes[p] = 0xd0
			view.setInt8(p + 1, n)
			this.pos += 2
		} else if (n >= -0x8000) {
			bytes[p] = 0xd1
			view.setInt16(p + 1, n)
			this.pos += 3
		} else if (n >= -0x80000000) {
			bytes[p] = 0xd2
			view.setInt32(p + 1, n)
			this.pos += 5
		} else {
			bytes[p] = 0xd3
			view.setInt32(p + 1, Math.floor(n / 0x100000000))
			view.setUint32(p + 5, n >>> 0)
			this.pos += 9
		}
	}

	private byte(b: number): void {
		this.ensure(1)
		this.bytes[this.pos++] = b
	}

	private ensure(n: number): void {
		if (this.pos + n > this.bytes.length) {
			const old = this.bytes
			this.allocate(Math.max(old.length * 2, this.pos + n))
			this.bytes.set(old.subarray(0, this.pos))
		}
	}

	private allocate(size: number): void {
		this.bytes = new Uint8Array(size)
		this.view = new DataView(this.bytes.buffer)
		this.buffer = Buffer.from(this.bytes.buffer)
	}
}

const writer = new ValueWriter()

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

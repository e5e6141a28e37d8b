// A MessagePack reader that keeps what a JavaScript decoder blurs: str and bin are
// different things, map keys keep their own type, duplicate keys and trailing bytes
// are visible. Tests read the bytes the client sends with it, as a strict server
// decoder (rmp-serde into typed structs) would.

export type Node =
	| { t: 'nil' }
	| { t: 'bool'; v: boolean }
	| { t: 'int'; v: number | bigint }
	| { t: 'float'; v: number }
	| { t: 'str'; v: string }
	| { t: 'bin'; v: Uint8Array }
	| { t: 'array'; v: Node[] }
	| { t: 'map'; v: [Node, Node][] }
	| { t: 'ext'; type: number; v: Uint8Array }

const utf8 = new TextDecoder('utf-8', { fatal: true })

/** Reads exactly one value; throws on truncation, invalid UTF-8, the unused 0xc1 byte or trailing bytes. */
export function readStrict(bytes: Uint8Array): Node {
	const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
	let pos = 0
	const need = (n: number) => {
		if (pos + n > bytes.byteLength) throw new Error(`truncated at byte ${pos}: need ${n} more`)
	}
	const u8 = () => (need(1), view.getUint8(pos++))
	const u16 = () => (need(2), (pos += 2), view.getUint16(pos - 2))
	const u32 = () => (need(4), (pos += 4), view.getUint32(pos - 4))
	const take = (n: number) => (need(n), (pos += n), bytes.subarray(pos - n, pos))

	const value = (): Node => {
		const b = u8()
		if (b <= 0x7f) return { t: 'int', v: b }
		if (b >= 0xe0) return { t: 'int', v: b - 0x100 }
		if (b >= 0x80 && b <= 0x8f) return map(b & 0x0f)
		if (b >= 0x90 && b <= 0x9f) return array(b & 0x0f)
		if (b >= 0xa0 && b <= 0xbf) return str(b & 0x1f)
		switch (b) {
			case 0xc0:
				return { t: 'nil' }
			case 0xc2:
				return { t: 'bool', v: false }
			case 0xc3:
				return { t: 'bool', v: true }
			case 0xc4:
				return { t: 'bin', v: take(u8()) }
			case 0xc5:
				return { t: 'bin', v: take(u16()) }
			case 0xc6:
				return { t: 'bin', v: take(u32()) }
			case 0xc7:
				return ext(u8())
			case 0xc8:
				return ext(u16())
			case 0xc9:
				return ext(u32())
			case 0xca:
				need(4)
				return { t: 'float', v: ((pos += 4), view.getFloat32(pos - 4)) }
			case 0xcb:
				need(8)
				return { t: 'float', v: ((pos += 8), view.getFloat64(pos - 8)) }
			case 0xcc:
				return { t: 'int', v: u8() }
			case 0xcd:
				return { t: 'int', v: u16() }
			case 0xce:
				return { t: 'int', v: u32() }
			case 0xcf:
				need(8)
				return { t: 'int', v: ((pos += 8), view.getBigUint64(pos - 8)) }
			case 0xd0:
				need(1)
				return { t: 'int', v: ((pos += 1), view.getInt8(pos - 1)) }
			case 0xd1:
				need(2)
				return { t: 'int', v: ((pos += 2), view.getInt16(pos - 2)) }
			case 0xd2:
				need(4)
				return { t: 'int', v: ((pos += 4), view.getInt32(pos - 4)) }
			case 0xd3:
				need(8)
				return { t: 'int', v: ((pos += 8), view.getBigInt64(pos - 8)) }
			case 0xd4:
				return ext(1)
			case 0xd5:
				return ext(2)
			case 0xd6:
				return ext(4)
			case 0xd7:
				return ext(8)
			case 0xd8:
				return ext(16)
			case 0xd9:
				return str(u8())
			case 0xda:
				return str(u16())
			case 0xdb:
				return str(u32())
			case 0xdc:
				return array(u16())
			case 0xdd:
				return array(u32())
			case 0xde:
				return map(u16())
			case 0xdf:
				return map(u32())
		}
		throw new Error(`byte 0x${b.toString(16)} at ${pos - 1} is not a MessagePack type`)
	}
	const str = (n: number): Node => ({ t: 'str', v: utf8.decode(take(n)) })
	const ext = (n: number): Node => {
		need(1)
		const type = view.getInt8(pos++)
		return { t: 'ext', type, v: take(n) }
	}
	const array = (n: number): Node => {
		const v: Node[] = []
		for (let i = 0; i < n; i++) v.push(value())
		return { t: 'array', v }
	}
	const map = (n: number): Node => {
		const v: [Node, Node][] = []
		for (let i = 0; i < n; i++) v.push([value(), value()])
		return { t: 'map', v }
	}

	const out = value()
	if (pos !== bytes.byteLength) throw new Error(`${bytes.byteLength - pos} bytes after the value`)
	return out
}

/**
 * The entries of a map whose keys are all str and distinct, as a Map from key to node.
 * Throws, naming `path`, if `node` is anything else.
 */
export function strMap(node: Node, path: string): Map<string, Node> {
	if (node.t !== 'map') throw new Error(`${path} is ${node.t}, not map`)
	const out = new Map<string, Node>()
	for (const [k, v] of node.v) {
		if (k.t !== 'str') throw new Error(`${path} has a ${k.t} key, not str`)
		if (out.has(k.v)) throw new Error(`${path} has the key ${JSON.stringify(k.v)} twice`)
		out.set(k.v, v)
	}
	return out
}

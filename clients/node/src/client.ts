import { randomBytes } from 'node:crypto'
import { decode, encode } from '@msgpack/msgpack'
import type { Msg, NatsConnection } from 'nats'
import { BaileysStoreError } from './errors.js'
import { type RetryClock, type RetryOptions, RetryPolicy, systemClock } from './retry.js'

/**
 * Retries (the README's "Retries and outages" says why the budget is 30 s): time-outs, no responders, a
 * lost or closed connection, and the service codes 409, 503 and 504 are retried
 * with the same body until `retryBudgetMs` has passed since the first attempt.
 */
export interface StoreOptions extends RetryOptions {
	/** Tenant: 1–128 characters of `[A-Za-z0-9_-]`. */
	tenant: string
	/** Session (one WhatsApp account): 1–128 characters of `[A-Za-z0-9_-]`. */
	session: string
	/** Subject prefix the service listens on (`api.prefix`). Default `bstore`. */
	prefix?: string
	/** How long to wait for one reply, per attempt. Default 5000 ms. */
	timeoutMs?: number
	/** Largest request body sent; must not exceed the service's `api.max_request_bytes`. Default 4 MiB. */
	maxRequestBytes?: number
	/** Largest encoded value or creds; the service's `limits.max_value_bytes`. Default 2 MiB. */
	maxValueBytes?: number
	/** A `keys.get` for more ids is split into parallel requests of this many ids. Default 1000. */
	maxIdsPerGet?: number
	/** Told about each retry (a pino logger fits). */
	logger?: { warn(obj: object, msg?: string): void }
	/** Time, waiting and jitter of the retries; tests pass a virtual clock. Default: the real ones. */
	clock?: RetryClock
}

export interface SessionInfo {
	seq: number
	exists: boolean
	creds: boolean
	keys: Record<string, number>
	bytes: number
	updated_at_ms: number | null
	events: number
}

/** Key values as bytes: `null` deletes. */
export type EncodedKeyData = Record<string, Record<string, Uint8Array | null>>

const NAME = /^[A-Za-z0-9_-]{1,128}$/
const KEY_TYPE = /^[A-Za-z0-9_.:-]{1,64}$/
const CONTROL = /\p{Cc}/u
const PREFIX_TOKEN = /^[^\s*>.]+$/
const MiB = 1024 * 1024

/** Throws INVALID_ID unless `name` is a valid tenant or session (same rule as the service). */
export function assertName(what: 'tenant' | 'session', name: string): void {
	if (typeof name !== 'string' || !NAME.test(name)) {
		throw new BaileysStoreError('INVALID_ID', 'validate', `${what} must be 1-128 characters of [A-Za-z0-9_-], got ${JSON.stringify(name)}`)
	}
}

function assertKey(op: string, type: string, id?: string): void {
	if (typeof type !== 'string' || !KEY_TYPE.test(type)) {
		throw new BaileysStoreError('INVALID_ID', op, `key type must be 1-64 characters of [A-Za-z0-9_.:-], got ${JSON.stringify(type)}`)
	}
	if (id !== undefined) {
		if (typeof id !== 'string') {
			throw new BaileysStoreError('INVALID_ID', op, `key id must be a string, got ${typeof id}`)
		}
		const len = Buffer.byteLength(id)
		if (len < 1 || len > 512 || CONTROL.test(id)) {
			throw new BaileysStoreError('INVALID_ID', op, `key id must be 1-512 bytes without control characters, got ${JSON.stringify(id)}`)
		}
	}
}

/** A write's request id: 22 characters of base64url (128 random bits). */
const newRid = (): string => randomBytes(16).toString('base64url')

/**
 * One session of baileys-store: the six operations of the wire protocol, with
 * validation, size limits and retries. Values are opaque bytes here.
 */
export class BaileysStoreClient {
	readonly subjectBase: string
	private readonly timeoutMs: number
	/** The retry policy in force (budget, count, pauses). */
	readonly retry: RetryPolicy
	private readonly maxRequestBytes: number
	private readonly maxValueBytes: number
	private readonly maxIdsPerGet: number

	constructor(
		// Only `request` is used, so tests can pass a stand-in.
		private readonly nc: Pick<NatsConnection, 'request'>,
		private readonly options: StoreOptions
	) {
		assertName('tenant', options.tenant)
		assertName('session', options.session)
		const prefix = options.prefix ?? 'bstore'
		if (!prefix.split('.').every((token) => PREFIX_TOKEN.test(token))) {
			throw new BaileysStoreError('INVALID_ID', 'validate', `prefix must be dot-separated NATS tokens without wildcards, got ${JSON.stringify(prefix)}`)
		}
		this.subjectBase = `${prefix}.${options.tenant}.${options.session}`
		this.timeoutMs = options.timeoutMs ?? 5000
		this.retry = new RetryPolicy(options, options.clock ?? systemClock)
		this.maxRequestBytes = options.maxRequestBytes ?? 4 * MiB
		this.maxValueBytes = options.maxValueBytes ?? 2 * MiB
		this.maxIdsPerGet = options.maxIdsPerGet ?? 1000
	}

	/** The stored creds, or null when the session has none. */
	async getCreds(): Promise<Uint8Array | null> {
		const reply = await this.request('creds.get', {})
		const creds = reply.creds
		if (creds === null || creds === undefined) return null
		if (!(creds instanceof Uint8Array)) throw badReply('creds.get', 'creds is not bin')
		return creds
	}

	/** Replaces the creds. Returns the event sequence of the write. */
	async putCreds(creds: Uint8Array): Promise<number> {
		this.assertValue('creds.put', 'creds', creds)
		return seqOf('creds.put', await this.request('creds.put', { rid: newRid(), creds }))
	}

	/** The stored values of `ids`; ids not stored are left out. */
	async getKeys(type: string, ids: string[]): Promise<Record<string, Uint8Array>> {
		assertKey('keys.get', type)
		if (!Array.isArray(ids)) throw new BaileysStoreError('INVALID_ID', 'keys.get', 'ids must be an array of strings')
		const unique = [...new Set(ids)]
		for (const id of unique) assertKey('keys.get', type, id)
		if (unique.length === 0) return {}
		const chunks: string[][] = []
		for (let i = 0; i < unique.length; i += this.maxIdsPerGet) chunks.push(unique.slice(i, i + this.maxIdsPerGet))
		const replies = (await Promise.all(chunks.map((chunk) => this.getChunk(type, chunk)))).flat()
		const out: Record<string, Uint8Array> = {}
		for (const reply of replies) {
			const values = reply.values
			if (!isMap(values)) throw badReply('keys.get', 'values is not a map')
			for (const [id, value] of Object.entries(values)) {
				if (!(value instanceof Uint8Array)) throw badReply('keys.get', `value of ${id} is not bin`)
				out[id] = value
			}
		}
		return out
	}

	private async getChunk(type: string, ids: string[]): Promise<Record<string, unknown>[]> {
		try {
			return [await this.request('keys.get', { type, ids })]
		} catch (err) {
			// The service answers 413 when the values would not fit in one NATS message: ask for halves.
			if (!(err instanceof BaileysStoreError && err.code === 413 && ids.length > 1)) throw err
			const half = Math.ceil(ids.length / 2)
			const parts = await Promise.all([this.getChunk(type, ids.slice(0, half)), this.getChunk(type, ids.slice(half))])
			return parts.flat()
		}
	}

	/**
	 * One page of the ids stored under `type`, in byte order: those after `after` (from the first
	 * without it), at most `limit` (the service's `limits.max_ids_per_call` without it; more is
	 * refused with 413). `next` is the `after` of the next page, `null` on the last one; a page may
	 * hold fewer ids than `limit` and still have a `next`. `seq` is the session's sequence the page
	 * was read at.
	 */
	async listKeys(type: string, after?: string, limit?: number): Promise<{ ids: string[]; next: string | null; seq: number }> {
		assertKey('keys.list', type)
		const body: Record<string, unknown> = { type }
		if (after !== undefined) {
			assertKey('keys.list', type, after)
			body.after = after
		}
		if (limit !== undefined) {
			if (!Number.isSafeInteger(limit) || limit < 1) {
				throw new BaileysStoreError('INVALID_VALUE', 'keys.list', `limit must be a positive integer, got ${String(limit)}`)
			}
			body.limit = limit
		}
		const reply = await this.request('keys.list', body)
		const { ids, next } = reply
		if (!Array.isArray(ids) || !ids.every((id) => typeof id === 'string')) throw badReply('keys.list', 'ids is not an array of str')
		if (next !== null && next !== undefined && typeof next !== 'string') throw badReply('keys.list', 'next is neither str nor nil')
		return { ids, next: next ?? null, seq: seqOf('keys.list', reply) }
	}

	/** Writes and deletes (`null`) keys of any number of types in one atomic request. */
	async setKeys(data: EncodedKeyData): Promise<number | undefined> {
		// Copied into a body of exactly the protocol's shape: bin or nil, nothing else.
		const body: Record<string, Record<string, Uint8Array | null>> = {}
		let count = 0
		for (const [type, values] of Object.entries(data)) {
			assertKey('keys.set', type)
			if (values === null || values === undefined) continue
			const entries = Object.entries(values)
			if (entries.length === 0) continue
			const out: Record<string, Uint8Array | null> = {}
			for (const [id, value] of entries) {
				assertKey('keys.set', type, id)
				if (value === null || value === undefined) {
					out[id] = null
				} else {
					this.assertValue('keys.set', `${type}/${id}`, value)
					out[id] = value
				}
				count++
			}
			body[type] = out
		}
		if (count === 0) return undefined
		return seqOf('keys.set', await this.request('keys.set', { rid: newRid(), data: body }))
	}

	/** Deletes the creds and every key of the session (logout). */
	async deleteSession(): Promise<number> {
		return seqOf('session.delete', await this.request('session.delete', { rid: newRid() }))
	}

	async info(): Promise<SessionInfo> {
		return (await this.request('session.info', {})) as unknown as SessionInfo
	}

	private assertValue(op: string, what: string, value: Uint8Array): void {
		if (!(value instanceof Uint8Array)) {
			throw new BaileysStoreError('INVALID_VALUE', op, `${what} must be a Uint8Array or Buffer, got ${value === null ? 'null' : typeof value}`)
		}
		if (value.byteLength > this.maxValueBytes) {
			throw new BaileysStoreError('TOO_LARGE', op, `${what} is ${value.byteLength} bytes, over maxValueBytes ${this.maxValueBytes}`)
		}
	}

	/** Sends one request, retrying with the same body (and so the same `rid`) when that may help. */
	private async request(op: string, body: Record<string, unknown>): Promise<Record<string, unknown>> {
		const data = encode(body)
		if (data.byteLength > this.maxRequestBytes) {
			throw new BaileysStoreError('TOO_LARGE', op, `request is ${data.byteLength} bytes, over maxRequestBytes ${this.maxRequestBytes}`)
		}
		const subject = `${this.subjectBase}.${op}`
		const logger = this.options.logger
		return this.retry.run(
			() => this.requestOnce(op, subject, data),
			logger &&
				(({ error, retry, pauseMs, elapsedMs }) =>
					logger.warn(
						{ op, subject, code: error.code, attempt: retry, pauseMs: Math.round(pauseMs), elapsedMs: Math.round(elapsedMs) },
						'baileys-store request failed, retrying'
					))
		)
	}

	private async requestOnce(op: string, subject: string, data: Uint8Array): Promise<Record<string, unknown>> {
		let msg: Msg
		try {
			msg = await this.nc.request(subject, data, { timeout: this.timeoutMs })
		} catch (err) {
			throw fromNatsError(op, err)
		}
		const code = msg.headers?.get('Nats-Service-Error-Code')
		if (code) {
			const message = msg.headers?.get('Nats-Service-Error') || 'service error'
			const num = Number(code)
			if (!Number.isInteger(num)) throw badReply(op, `unexpected error code ${JSON.stringify(code)}: ${message}`)
			throw new BaileysStoreError(num, op, message)
		}
		let reply: unknown
		try {
			reply = decode(msg.data)
		} catch (err) {
			throw new BaileysStoreError('BAD_REPLY', op, 'reply is not MessagePack', { cause: err })
		}
		if (!isMap(reply)) throw badReply(op, 'reply is not a map')
		return reply
	}
}

function fromNatsError(op: string, err: unknown): BaileysStoreError {
	const code = (err as { code?: unknown })?.code
	const message = err instanceof Error ? err.message : String(err)
	switch (code) {
		case 'TIMEOUT':
			return new BaileysStoreError('TIMEOUT', op, 'no reply in time', { cause: err })
		case '503':
			return new BaileysStoreError('NO_RESPONDERS', op, 'no service instance is listening', { cause: err })
		case 'DISCONNECT':
			return new BaileysStoreError('DISCONNECTED', op, 'the NATS connection was lost', { cause: err })
		case 'CONNECTION_CLOSED':
			return new BaileysStoreError('CLOSED', op, 'the NATS connection is closed', { cause: err })
		case 'MAX_PAYLOAD_EXCEEDED':
			return new BaileysStoreError('TOO_LARGE', op, "request is over the NATS server's max_payload", { cause: err })
		default:
			return new BaileysStoreError('NATS', op, message, { cause: err })
	}
}

const isMap = (v: unknown): v is Record<string, unknown> =>
	v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Uint8Array)

const badReply = (op: string, message: string) => new BaileysStoreError('BAD_REPLY', op, message)

function seqOf(op: string, reply: Record<string, unknown>): number {
	if (typeof reply.seq !== 'number') throw badReply(op, 'seq is missing')
	return reply.seq
}

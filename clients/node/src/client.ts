import { randomBytes } from 'node:crypto'
import { performance } from 'node:perf_hooks'
import { Decoder, Encoder } from '@msgpack/msgpack'
import { createInbox, ErrorCode, Events, type Msg, type NatsConnection, NatsError, type Subscription } from 'nats'
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
	/**
	 * How long to wait for one reply, per attempt. Default 5000 ms. Waiting requests are checked
	 * every tenth of it (at most every 50 ms), so a time-out is reported up to that much later.
	 */
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
	/**
	 * Hold the session's writer claim (`session.claim`) and, while its lease is valid, answer
	 * `keys.get` from what this client has read and written, including ids it knows are not
	 * stored. Used by `useNatsAuthState` only; against a service without claims it does nothing.
	 * Default true.
	 */
	claim?: boolean
}

/** The reply of `session.claim`. */
export interface ClaimReply {
	/** The claim granted or renewed; null: another claim may still be in use, ask again after `waitMs`. */
	claim: string | null
	/** How long the claim holds from when the request was sent. */
	leaseMs: number
	waitMs: number
	seq: number
}

/** The values of one `keys.get` request: found ids and the session's sequence they were read at. */
export interface KeysChunk {
	ids: string[]
	values: Record<string, Uint8Array>
	seq: number
}

/** A write's outcome: its sequence, and the claim's renewed lease when it carried one. */
export interface Written {
	seq: number
	leaseMs?: number
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

/**
 * A write's request id: 22 characters of base64url (128 random bits). The bits are drawn from the
 * CSPRNG 256 ids at a time: one call into it per request cost as much as the rest of the request's
 * encoding.
 */
export function newRid(): string {
	if (ridAt === ridPool.length) {
		ridPool = randomBytes(16 * 256)
		ridAt = 0
	}
	ridAt += 16
	return ridPool.toString('base64url', ridAt - 16, ridAt)
}
let ridPool = Buffer.alloc(0)
let ridAt = 0

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
	/** The connection's shared reply subscription; undefined for a stand-in that has only `request`. */
	private readonly mux: RequestMux | undefined

	constructor(
		// A real connection is used through one reply subscription it shares with every client on it
		// (RequestMux); a stand-in with only `request` (tests) goes through `request`.
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
		this.mux = RequestMux.of(nc, this.timeoutMs)
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
		return (await this.putCredsAs(creds)).seq
	}

	/** `putCreds` as the holder of `claim` (when given), with the request id `rid`. */
	async putCredsAs(creds: Uint8Array, claim?: string, rid = newRid()): Promise<Written> {
		this.assertValue('creds.put', 'creds', creds)
		return writtenOf('creds.put', await this.request('creds.put', withClaim({ rid, creds }, claim)))
	}

	/**
	 * `session.claim`: asks for the session's writer claim (without `claim`) or renews `claim`.
	 * A claim that is no longer the session's is refused with 410; a service without claims
	 * answers 404.
	 */
	async claim(claim?: string): Promise<ClaimReply> {
		if (claim !== undefined && !RID.test(claim)) throw new BaileysStoreError('INVALID_ID', 'session.claim', 'claim must be 1-64 characters of [A-Za-z0-9_-]')
		const reply = await this.request('session.claim', claim === undefined ? {} : { claim })
		const id = reply.claim
		if (id !== null && typeof id !== 'string') throw badReply('session.claim', 'claim is neither str nor nil')
		const leaseMs = reply.lease_ms
		const waitMs = reply.wait_ms
		if (typeof leaseMs !== 'number' || typeof waitMs !== 'number') throw badReply('session.claim', 'lease_ms or wait_ms is missing')
		return { claim: id, leaseMs, waitMs, seq: seqOf('session.claim', reply) }
	}

	/** The stored values of `ids`; ids not stored are left out. */
	async getKeys(type: string, ids: string[]): Promise<Record<string, Uint8Array>> {
		const chunks = await this.getKeyChunks(type, ids)
		if (chunks.length === 1) return (chunks[0] as KeysChunk).values
		const out: Record<string, Uint8Array> = {}
		for (const chunk of chunks) Object.assign(out, chunk.values)
		return out
	}

	/** `getKeys`, as the requests it took: which ids each asked for, what it found, and at which `seq`. */
	async getKeyChunks(type: string, ids: string[]): Promise<KeysChunk[]> {
		assertKey('keys.get', type)
		if (!Array.isArray(ids)) throw new BaileysStoreError('INVALID_ID', 'keys.get', 'ids must be an array of strings')
		const unique = [...new Set(ids)]
		for (const id of unique) assertKey('keys.get', type, id)
		if (unique.length === 0) return []
		let replies: [string[], Record<string, unknown>][]
		if (unique.length <= this.maxIdsPerGet) {
			replies = await this.getChunk(type, unique)
		} else {
			const chunks: string[][] = []
			for (let i = 0; i < unique.length; i += this.maxIdsPerGet) chunks.push(unique.slice(i, i + this.maxIdsPerGet))
			replies = (await Promise.all(chunks.map((chunk) => this.getChunk(type, chunk)))).flat()
		}
		return replies.map(([asked, reply]) => {
			const values = reply.values
			if (!isMap(values)) throw badReply('keys.get', 'values is not a map')
			for (const [id, value] of Object.entries(values)) {
				if (!(value instanceof Uint8Array)) throw badReply('keys.get', `value of ${id} is not bin`)
			}
			return { ids: asked, values: values as Record<string, Uint8Array>, seq: seqOf('keys.get', reply) }
		})
	}

	private getChunk(type: string, ids: string[]): Promise<[string[], Record<string, unknown>][]> {
		return this.request('keys.get', { type, ids }).then(
			(reply) => [[ids, reply]],
			async (err) => {
				// The service answers 413 when the values would not fit in one NATS message: ask for halves.
				if (!(err instanceof BaileysStoreError && err.code === 413 && ids.length > 1)) throw err
				const half = Math.ceil(ids.length / 2)
				const parts = await Promise.all([this.getChunk(type, ids.slice(0, half)), this.getChunk(type, ids.slice(half))])
				return parts.flat()
			}
		)
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
		return (await this.setKeysAs(data))?.seq
	}

	/** `setKeys` as the holder of `claim` (when given), with the request id `rid`; undefined when there is nothing to write. */
	async setKeysAs(data: EncodedKeyData, claim?: string, rid = newRid()): Promise<Written | undefined> {
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
		return writtenOf('keys.set', await this.request('keys.set', withClaim({ rid, data: body }, claim)))
	}

	/** Deletes the creds and every key of the session (logout). */
	async deleteSession(): Promise<number> {
		return (await this.deleteSessionAs()).seq
	}

	/** `deleteSession` as the holder of `claim` (when given), with the request id `rid`. */
	async deleteSessionAs(claim?: string, rid = newRid()): Promise<Written> {
		return writtenOf('session.delete', await this.request('session.delete', withClaim({ rid }, claim)))
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
	private request(op: string, body: Record<string, unknown>): Promise<Record<string, unknown>> {
		// Not an async function: the promise of the attempt that succeeds is the one handed back.
		const data = bodyEncoder.encode(body)
		if (data.byteLength > this.maxRequestBytes) {
			return Promise.reject(new BaileysStoreError('TOO_LARGE', op, `request is ${data.byteLength} bytes, over maxRequestBytes ${this.maxRequestBytes}`))
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

	/** One attempt: resolves with the reply's map, rejects with a BaileysStoreError. */
	private requestOnce(op: string, subject: string, data: Uint8Array): Promise<Record<string, unknown>> {
		if (this.mux) return this.mux.request(op, subject, data, this.timeoutMs)
		return this.nc.request(subject, data, { timeout: this.timeoutMs }).then(
			(msg) => readReply(op, msg),
			(err) => {
				throw fromNatsError(op, err)
			}
		)
	}
}

/** One encoder for every request body (its buffer is reused; `encode` returns a copy of the bytes). */
const bodyEncoder = new Encoder()
const replyDecoder = new Decoder()

/** The reply's map, or the BaileysStoreError its headers or its body make. */
function readReply(op: string, msg: Msg): Record<string, unknown> {
	const headers = msg.headers
	if (headers) {
		const code = headers.get('Nats-Service-Error-Code')
		if (code) {
			const message = headers.get('Nats-Service-Error') || 'service error'
			const num = Number(code)
			if (!Number.isInteger(num)) throw badReply(op, `unexpected error code ${JSON.stringify(code)}: ${message}`)
			throw new BaileysStoreError(num, op, message)
		}
	}
	let reply: unknown
	try {
		reply = replyDecoder.decode(msg.data)
	} catch (err) {
		throw new BaileysStoreError('BAD_REPLY', op, 'reply is not MessagePack', { cause: err })
	}
	if (!isMap(reply)) throw badReply(op, 'reply is not a map')
	return reply
}

/** What the multiplexer uses of a NATS connection. */
type MuxConnection = Pick<NatsConnection, 'publish' | 'subscribe' | 'closed' | 'status' | 'isDraining'> & {
	/** NatsConnectionImpl's options: the inbox prefix the connection was opened with. */
	readonly options?: { inboxPrefix?: string }
}

const isMuxConnection = (nc: object): nc is MuxConnection =>
	['publish', 'subscribe', 'closed', 'status', 'isDraining'].every((name) => typeof (nc as Record<string, unknown>)[name] === 'function')

/** A request waiting for its reply. */
interface Pending {
	readonly op: string
	readonly subject: string
	/** performance.now() after which the attempt has timed out. */
	readonly deadline: number
	readonly resolve: (reply: Record<string, unknown>) => void
	readonly reject: (err: BaileysStoreError) => void
}

/**
 * Request-reply over one subscription per connection, `<inbox prefix>.<nuid>.*`, shared by every
 * client on that connection: each request publishes with the reply subject `<that>.<token>` and
 * waits in a map by token; one interval timer, running only while requests wait, times them out.
 * nats.js's own `request()` does the same demultiplexing but builds Errors (a stack for a possible
 * time-out, a "cancelled" rejection) and a timer for every request; here the success path makes one
 * promise and no Error. The subscription is an ordinary one: nats.js sends it again after a
 * reconnect, as it does its own, and a request lost in a disconnect times out as before. The
 * server's "no responders" status (503, no body) is NO_RESPONDERS, as nats.js's 503 was.
 */
class RequestMux {
	private static readonly byConnection = new WeakMap<object, RequestMux>()

	/** The multiplexer of `nc`, made (and subscribed) by the first client on it; undefined for a stand-in. */
	static of(nc: object, timeoutMs: number): RequestMux | undefined {
		if (!isMuxConnection(nc)) return undefined
		let mux = RequestMux.byConnection.get(nc)
		if (!mux) {
			mux = new RequestMux(nc)
			RequestMux.byConnection.set(nc, mux)
		}
		mux.useTimeout(timeoutMs)
		return mux
	}

	/** `<inbox prefix>.<nuid>.`: a reply subject is this and a token. */
	private readonly inbox: string
	private sub: Subscription | undefined
	private readonly pending = new Map<string, Pending>()
	private nextToken = 0
	private timer: ReturnType<typeof setInterval> | undefined
	/** How often waiting requests are checked for their deadline: a tenth of the shortest time-out, 1-50 ms. */
	private tickMs = 50

	private constructor(private readonly nc: MuxConnection) {
		// The connection's own prefix: a bot may be allowed to subscribe under its own inbox prefix only.
		this.inbox = `${createInbox(nc.options?.inboxPrefix)}.`
		try {
			this.subscribe()
		} catch {
			// Closed or draining: the first request tries again and reports why it cannot.
		}
		void nc.closed().then(() => this.failAll(NatsError.errorForCode(ErrorCode.ConnectionClosed)))
		void this.watchPermissions()
	}

	request(op: string, subject: string, data: Uint8Array, timeoutMs: number): Promise<Record<string, unknown>> {
		try {
			if (this.nc.isDraining()) throw NatsError.errorForCode(ErrorCode.ConnectionDraining)
			if (!this.sub) this.subscribe()
			const token = (this.nextToken++).toString(36)
			this.nc.publish(subject, data, { reply: this.inbox + token })
			const deadline = performance.now() + timeoutMs
			if (this.timer === undefined) this.startTimer()
			return new Promise((resolve, reject) => {
				this.pending.set(token, { op, subject, deadline, resolve, reject })
			})
		} catch (err) {
			return Promise.reject(fromNatsError(op, err))
		}
	}

	private useTimeout(timeoutMs: number): void {
		const tick = Math.min(50, Math.max(1, Math.ceil(timeoutMs / 10)))
		if (tick >= this.tickMs) return
		this.tickMs = tick
		if (this.timer !== undefined) {
			clearInterval(this.timer)
			this.startTimer()
		}
	}

	private subscribe(): void {
		this.sub = this.nc.subscribe(`${this.inbox}*`, { callback: this.onMessage })
	}

	private readonly onMessage = (err: NatsError | null, msg: Msg): void => {
		if (err) {
			// The subscription is gone (a permissions violation): whatever waits on it fails, and the next request subscribes again.
			this.sub = undefined
			this.failAll(err)
			return
		}
		const token = msg.subject.slice(this.inbox.length)
		const p = this.pending.get(token)
		if (!p) return // timed out already, or not ours
		this.pending.delete(token)
		if (msg.data.length === 0 && msg.headers?.code === 503) {
			// The server's answer when nothing is subscribed to the request subject.
			p.reject(new BaileysStoreError('NO_RESPONDERS', p.op, 'no service instance is listening'))
			return
		}
		let reply: Record<string, unknown>
		try {
			reply = readReply(p.op, msg)
		} catch (e) {
			p.reject(e as BaileysStoreError)
			return
		}
		p.resolve(reply)
	}

	private startTimer(): void {
		this.timer = setInterval(this.sweep, this.tickMs)
		// It never keeps the process alive by itself: a waiting request has the connection's socket for that.
		this.timer.unref()
	}

	private readonly sweep = (): void => {
		if (this.pending.size === 0) {
			clearInterval(this.timer)
			this.timer = undefined
			return
		}
		const now = performance.now()
		for (const [token, p] of this.pending) {
			if (p.deadline > now) continue
			this.pending.delete(token)
			p.reject(new BaileysStoreError('TIMEOUT', p.op, 'no reply in time'))
		}
	}

	private failAll(err: unknown): void {
		const waiting = [...this.pending.values()]
		this.pending.clear()
		for (const p of waiting) p.reject(fromNatsError(p.op, err))
	}

	/**
	 * A publish the connection may not make is refused by the server with an -ERR that names the
	 * subject but not the request: the oldest request waiting on that subject fails at once, as with
	 * nats.js's `request()`, rather than waiting for its time-out.
	 */
	private async watchPermissions(): Promise<void> {
		for await (const status of this.nc.status()) {
			const ctx = status.permissionContext
			if (status.type !== Events.Error || ctx?.operation !== 'publish') continue
			for (const [token, p] of this.pending) {
				if (p.subject !== ctx.subject) continue
				this.pending.delete(token)
				p.reject(fromNatsError(p.op, new NatsError(`Permissions Violation for Publish to "${ctx.subject}"`, ErrorCode.PermissionsViolation)))
				break
			}
		}
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

const RID = /^[A-Za-z0-9_-]{1,64}$/

/** A write's body with the claim first, as the protocol puts it (any order decodes). */
function withClaim(body: Record<string, unknown>, claim: string | undefined): Record<string, unknown> {
	return claim === undefined ? body : { claim, ...body }
}

function writtenOf(op: string, reply: Record<string, unknown>): Written {
	const seq = seqOf(op, reply)
	const leaseMs = reply.lease_ms
	return typeof leaseMs === 'number' ? { seq, leaseMs } : { seq }
}

function seqOf(op: string, reply: Record<string, unknown>): number {
	if (typeof reply.seq !== 'number') throw badReply(op, 'seq is missing')
	return reply.seq
}

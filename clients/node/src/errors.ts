/**
 * Error codes the service sends in `Nats-Service-Error-Code` (docs/protocol.md).
 */
export const ServiceErrorCode = {
	BAD_REQUEST: 400,
	UNKNOWN_OP: 404,
	TOO_LARGE: 413,
	INVALID_ID: 422,
	CONFLICT: 409,
	UNAVAILABLE: 503,
	TIMEOUT: 504,
	UNREADABLE: 520,
	SUPERSEDED: 410,
	INTERNAL: 500
} as const

/**
 * Codes raised by the client itself, before sending or when no usable reply came.
 * - `TIMEOUT`: no reply within `timeoutMs`, on the last attempt.
 * - `NO_RESPONDERS`: no service instance subscribed (the service is down, restarting or failing over).
 * - `DISCONNECTED`: the NATS connection was lost while the request was on its way.
 * - `CLOSED`: the NATS connection is closed (for good, unless whatever stands behind `request` opens a new one).
 * - `TOO_LARGE`: the request or one value is over `maxRequestBytes` / `maxValueBytes`; nothing was sent.
 * - `INVALID_ID`: tenant, session, key type or key id breaks the protocol's rules; nothing was sent.
 * - `INVALID_VALUE`: a key value or the creds is not bytes (Uint8Array or Buffer); nothing was sent.
 * - `BAD_REPLY`: a reply, or a stored value, could not be decoded.
 * - `NATS`: any other NATS failure (connection draining, permission denied, ...).
 */
export type ClientErrorCode = 'TIMEOUT' | 'NO_RESPONDERS' | 'DISCONNECTED' | 'CLOSED' | 'TOO_LARGE' | 'INVALID_ID' | 'INVALID_VALUE' | 'BAD_REPLY' | 'NATS'

/**
 * Failures worth retrying with the same body, so the same `rid`: nothing was
 * applied (409, 503, no responders) or the outcome is unknown (time-outs, 504, a
 * lost connection), and the cause passes by itself (a restart, a failover, a
 * reconnect, another writer). A 409 reaches the client only once the service has
 * used up its own retries against the event log; nothing was applied, so
 * retrying it is as safe as the rest, and a write Baileys sees fail costs it a
 * message or Signal state.
 */
const RETRYABLE = new Set<number | string>([409, 503, 504, 'TIMEOUT', 'NO_RESPONDERS', 'DISCONNECTED', 'CLOSED'])

export class BaileysStoreError extends Error {
	override readonly name = 'BaileysStoreError'
	/** A number from the protocol's table, or a {@link ClientErrorCode}. */
	readonly code: number | ClientErrorCode
	/** The operation, e.g. `keys.set`. */
	readonly op: string
	/** Whether a later retry of the same request may succeed. */
	readonly retryable: boolean

	constructor(code: number | ClientErrorCode, op: string, message: string, options?: { cause?: unknown }) {
		super(`${op}: ${message} (${code})`, options)
		this.code = code
		this.op = op
		this.retryable = RETRYABLE.has(code)
	}
}

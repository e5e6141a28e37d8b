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
	INTERNAL: 500
} as const

/**
 * Codes raised by the client itself, before sending or when no usable reply came.
 * - `TIMEOUT`: no reply within `timeoutMs`, on the last attempt.
 * - `NO_RESPONDERS`: no service instance subscribed (the service is not running).
 * - `TOO_LARGE`: the request or one value is over `maxRequestBytes` / `maxValueBytes`; nothing was sent.
 * - `INVALID_ID`: tenant, session, key type or key id breaks the protocol's rules; nothing was sent.
 * - `BAD_REPLY`: a reply, or a stored value, could not be decoded.
 * - `NATS`: any other NATS failure (connection closed or draining, permission denied, ...).
 */
export type ClientErrorCode = 'TIMEOUT' | 'NO_RESPONDERS' | 'TOO_LARGE' | 'INVALID_ID' | 'BAD_REPLY' | 'NATS'

/** Service codes worth retrying with the same `rid`: nothing was applied, or the outcome is unknown. */
const RETRYABLE = new Set<number | string>([409, 503, 504, 'TIMEOUT', 'NO_RESPONDERS'])

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

/**
 * How long the client keeps trying a request the service could not answer.
 *
 * The budget is set by what Baileys does with a failed read: its `validateSession`
 * catches any error and reports "no session", and libsignal then replaces the
 * Signal session with a new one built from a fresh pre-key bundle. A read that
 * gives up during a service restart (about 3 s after a SIGKILL) or a failover of a
 * dead instance's partitions (up to about 7 s) therefore re-keys the bot's
 * contacts, while a read that waits only delays a message. So the default is to
 * keep trying for 30 s, several times the longest outage expected, with
 * exponential back-off and full jitter so that many bots that failed together do
 * not come back together.
 */
import { BaileysStoreError } from './errors.js'

/** Where the retry loop reads the time, waits and draws its jitter. Tests pass a virtual one. */
export interface RetryClock {
	/** Milliseconds, on any monotonic scale. */
	now(): number
	sleep(ms: number): Promise<void>
	/** A number in [0, 1). */
	random(): number
}

export const systemClock: RetryClock = {
	now: () => performance.now(),
	sleep: (ms) => new Promise<void>((resolve) => setTimeout(resolve, ms)),
	random: Math.random
}

export interface RetryOptions {
	/**
	 * How long retryable failures are retried, counted from the first attempt: no
	 * attempt starts later than this, and the last one starts right at the end.
	 * Default 30 000 ms.
	 */
	retryBudgetMs?: number
	/** At most this many retries, whichever limit comes first. Default: no limit but the budget. */
	retries?: number
	/** Ceiling of the first pause; it doubles at each retry. Default 50 ms. */
	retryDelayMs?: number
	/** Ceiling of every pause. Default 2000 ms. */
	maxRetryDelayMs?: number
}

export const RETRY_DEFAULTS: Required<RetryOptions> = {
	retryBudgetMs: 30_000,
	retries: Infinity,
	retryDelayMs: 50,
	maxRetryDelayMs: 2_000
}

/** The longest pause before retry number `retry` (0 for the first): `retryDelayMs · 2^retry`, capped. */
export function pauseCeiling(retry: number, options: Pick<Required<RetryOptions>, 'retryDelayMs' | 'maxRetryDelayMs'>): number {
	return Math.min(options.retryDelayMs * 2 ** retry, options.maxRetryDelayMs)
}

/** What one retry is told to the logger. */
export interface RetryEvent {
	error: BaileysStoreError
	/** 1 for the first retry. */
	retry: number
	pauseMs: number
	/** Time since the first attempt started. */
	elapsedMs: number
}

/** Runs attempts until one succeeds, an error is not retryable, or the budget or the retry count is used up. */
export class RetryPolicy {
	readonly budgetMs: number
	readonly retries: number
	readonly retryDelayMs: number
	readonly maxRetryDelayMs: number

	constructor(
		options: RetryOptions = {},
		private readonly clock: RetryClock = systemClock
	) {
		this.budgetMs = options.retryBudgetMs ?? RETRY_DEFAULTS.retryBudgetMs
		this.retries = options.retries ?? RETRY_DEFAULTS.retries
		this.retryDelayMs = options.retryDelayMs ?? RETRY_DEFAULTS.retryDelayMs
		this.maxRetryDelayMs = options.maxRetryDelayMs ?? RETRY_DEFAULTS.maxRetryDelayMs
		for (const [name, value] of Object.entries({ retryBudgetMs: this.budgetMs, retries: this.retries, retryDelayMs: this.retryDelayMs, maxRetryDelayMs: this.maxRetryDelayMs })) {
			if (typeof value !== 'number' || Number.isNaN(value) || value < 0) throw new RangeError(`${name} must be a number >= 0, got ${String(value)}`)
		}
	}

	/**
	 * Full jitter: uniform in [0, ceiling). Spreads retries of many clients over the
	 * whole window instead of bunching them at its end.
	 */
	pause(retry: number): number {
		return this.clock.random() * pauseCeiling(retry, this)
	}

	/**
	 * The first attempt's promise is passed on as it is when it succeeds: the retry loop, and
	 * its promises, exist only once an attempt has failed.
	 */
	run<T>(attempt: () => Promise<T>, onRetry?: (event: RetryEvent) => void): Promise<T> {
		const start = this.clock.now()
		let first: Promise<T>
		try {
			first = attempt()
		} catch (err) {
			first = Promise.reject(err)
		}
		return first.catch((err: unknown) => this.retryAfter(err, start, attempt, onRetry))
	}

	private async retryAfter<T>(err: unknown, start: number, attempt: () => Promise<T>, onRetry?: (event: RetryEvent) => void): Promise<T> {
		for (let retry = 0; ; retry++) {
			if (!(err instanceof BaileysStoreError) || !err.retryable || retry >= this.retries) throw err
			const elapsedMs = this.clock.now() - start
			const left = this.budgetMs - elapsedMs
			if (left <= 0) throw err
			// The last pause is cut short so that one attempt is made at the end of the budget.
			const pauseMs = Math.min(this.pause(retry), left)
			onRetry?.({ error: err, retry: retry + 1, pauseMs, elapsedMs })
			await this.clock.sleep(pauseMs)
			try {
				return await attempt()
			} catch (next) {
				err = next
			}
		}
	}
}

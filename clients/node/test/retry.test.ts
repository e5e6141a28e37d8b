// The retry schedule on a virtual clock: how long the client keeps trying, the pauses
// between attempts, and which failures are retried at all. Nothing here waits for real.
import assert from 'node:assert/strict'
import { describe, it } from 'node:test'
import { decode, encode } from '@msgpack/msgpack'
import type { Msg, NatsConnection } from 'nats'
import { BaileysStoreClient, BaileysStoreError, pauseCeiling, RETRY_DEFAULTS, type RetryClock, RetryPolicy, type StoreOptions } from '../src/index.js'

/** Time moves only when the client sleeps or an attempt takes time. */
class VirtualClock implements RetryClock {
	t = 0
	readonly sleeps: number[] = []
	constructor(private readonly draw: () => number = Math.random) {}
	now() {
		return this.t
	}
	async sleep(ms: number) {
		assert.ok(ms >= 0, `negative pause ${ms}`)
		this.sleeps.push(ms)
		this.t += ms
	}
	random() {
		return this.draw()
	}
}

type Outcome = { reply: Record<string, unknown> } | { service: number } | { nats: string; takesMs?: number }

/**
 * A stand-in for NATS whose answer depends on the attempt and the virtual time, as a
 * service that goes away and comes back would. Records when each attempt started.
 */
function scriptedNats(clock: VirtualClock, answer: (attempt: number, t: number) => Outcome) {
	const attempts: { t: number; subject: string; body: Record<string, unknown> }[] = []
	const nc = {
		async request(subject: string, data?: Uint8Array, opts?: { timeout: number }): Promise<Msg> {
			attempts.push({ t: clock.t, subject, body: decode(data!) as Record<string, unknown> })
			const out = answer(attempts.length - 1, clock.t)
			if ('nats' in out) {
				// A time-out costs the whole per-attempt timeout; other NATS errors come at once.
				clock.t += out.takesMs ?? (out.nats === 'TIMEOUT' ? opts!.timeout : 0)
				throw Object.assign(new Error(out.nats), { code: out.nats })
			}
			if ('service' in out) {
				const headers = new Map([
					['Nats-Service-Error-Code', String(out.service)],
					['Nats-Service-Error', 'refused']
				])
				return { data: new Uint8Array(0), headers: { get: (k: string) => headers.get(k) ?? '' } } as unknown as Msg
			}
			return { data: encode(out.reply), headers: undefined } as unknown as Msg
		}
	}
	return { nc: nc as unknown as NatsConnection, attempts }
}

const base = { tenant: 'acme', session: 'bot-1' }
const ok = (op: string): Outcome => ({
	reply: op === 'creds.get' ? { creds: null, seq: 1 } : op === 'keys.get' ? { values: {}, seq: 1 } : op === 'session.info' ? { seq: 1, exists: false } : { seq: 1 }
})

/** Every op, reads and writes, as a call on the client. */
const OPS: Record<string, (s: BaileysStoreClient) => Promise<unknown>> = {
	'creds.get': (s) => s.getCreds(),
	'keys.get': (s) => s.getKeys('session', ['100000000000002_1.1']),
	'session.info': (s) => s.info(),
	'creds.put': (s) => s.putCreds(new Uint8Array([1, 2, 3])),
	'keys.set': (s) => s.setKeys({ session: { '100000000000002_1.1': new Uint8Array([1]) } }),
	'session.delete': (s) => s.deleteSession()
}

async function caught(p: Promise<unknown>): Promise<BaileysStoreError> {
	try {
		await p
	} catch (err) {
		assert.ok(err instanceof BaileysStoreError, `expected a BaileysStoreError, got ${String(err)}`)
		return err
	}
	assert.fail('expected the request to fail')
}

function client(clock: VirtualClock, answer: (attempt: number, t: number) => Outcome, options: Partial<StoreOptions> = {}) {
	const { nc, attempts } = scriptedNats(clock, answer)
	return { store: new BaileysStoreClient(nc, { ...base, ...options, clock }), attempts }
}

describe('retry defaults', () => {
	it('are a 30 s budget, pauses from 50 ms doubling to 2 s, no separate retry count', () => {
		assert.deepEqual(RETRY_DEFAULTS, { retryBudgetMs: 30_000, retries: Infinity, retryDelayMs: 50, maxRetryDelayMs: 2_000 })
		const policy = new BaileysStoreClient(scriptedNats(new VirtualClock(), () => ok('x')).nc, base).retry
		assert.deepEqual([policy.budgetMs, policy.retries, policy.retryDelayMs, policy.maxRetryDelayMs], [30_000, Infinity, 50, 2_000])
		assert.deepEqual(
			Array.from({ length: 9 }, (_, i) => pauseCeiling(i, policy)),
			[50, 100, 200, 400, 800, 1600, 2000, 2000, 2000]
		)
	})

	for (const [op, call] of Object.entries(OPS)) {
		it(`${op}: a service that never answers is tried for 30 s, then the error surfaces`, async () => {
			const clock = new VirtualClock()
			const { store, attempts } = client(clock, () => ({ nats: '503' }))
			const err = await caught(call(store))
			assert.equal(err.code, 'NO_RESPONDERS')
			assert.equal(err.retryable, true)
			assert.equal(attempts[0]!.t, 0)
			// The last attempt is made at the very end of the budget, none after it.
			assert.equal(attempts.at(-1)!.t, 30_000)
			assert.equal(clock.t, 30_000)
			assert.ok(attempts.length > 15, `only ${attempts.length} attempts in 30 s`)
			// Writes keep their rid across every attempt.
			assert.equal(new Set(attempts.map((a) => a.body.rid)).size, 1)
			if (op.endsWith('put') || op.endsWith('set') || op.endsWith('delete')) assert.match(String(attempts[0]!.body.rid), /^[A-Za-z0-9_-]{22}$/)
		})
	}

	it('time-outs of 5 s each are retried until the budget has passed since the first attempt', async () => {
		const clock = new VirtualClock()
		const { store, attempts } = client(clock, () => ({ nats: 'TIMEOUT' }))
		const err = await caught(store.getKeys('session', ['a.0']))
		assert.equal(err.code, 'TIMEOUT')
		assert.ok(attempts.every((a) => a.t <= 30_000))
		// The failure comes no earlier than the budget, and at most one time-out after it.
		assert.ok(clock.t >= 30_000 && clock.t <= 35_000, `gave up at ${clock.t} ms`)
		assert.ok(attempts.length >= 6, `${attempts.length} attempts`)
	})

	it('rides out a restart and a 7 s failover, with the same rid throughout', async () => {
		// No responders while the instance is dead, then the new owner answers 503 and 504 while it takes over.
		const answer = (op: string) => (_: number, t: number): Outcome => (t < 2_700 ? { nats: '503' } : t < 5_000 ? { service: 503 } : t < 7_000 ? { service: 504 } : ok(op))
		const clock = new VirtualClock()
		const { store, attempts } = client(clock, answer('keys.set'))
		assert.equal(await store.setKeys({ session: { 'a.0': new Uint8Array([1]) } }), 1)
		assert.ok(clock.t >= 7_000 && clock.t < 9_000, `succeeded at ${clock.t} ms`)
		assert.equal(new Set(attempts.map((a) => a.body.rid)).size, 1)
		const read = client(new VirtualClock(), answer('keys.get'))
		assert.deepEqual(await read.store.getKeys('session', ['a.0']), {})
	})

	it('the old budget (5 retries, about 3 s) would not have', async () => {
		// The schedule the client had before: the same outage ends in an error, which Baileys turns into a new session.
		const clock = new VirtualClock()
		const { store } = client(clock, (_, t) => (t < 4_000 ? { nats: '503' } : ok('keys.get')), { retries: 5, retryDelayMs: 100 })
		assert.equal((await caught(store.getKeys('session', ['a.0']))).code, 'NO_RESPONDERS')
		assert.ok(clock.t < 4_000)
	})
})

describe('retry pauses', () => {
	it('are full jitter: a uniform draw times the ceiling, for each retry', async () => {
		const draws = [0, 0.5, 0.999, 0.25, 0.75, 0.1, 0.9, 0.6, 0.3, 0.0001]
		let i = 0
		const clock = new VirtualClock(() => draws[i++ % draws.length]!)
		const { store } = client(clock, (n) => (n < draws.length ? { nats: '503' } : ok('creds.get')))
		await store.getCreds()
		assert.equal(clock.sleeps.length, draws.length)
		clock.sleeps.forEach((pause, n) => assert.equal(pause, draws[n]! * pauseCeiling(n, store.retry), `pause ${n}`))
	})

	it('stay within [0, min(2 s, 50 ms * 2^n)) with real randomness, and vary', async () => {
		const clock = new VirtualClock()
		const { store } = client(clock, () => ({ nats: 'TIMEOUT', takesMs: 0 }))
		await caught(store.getCreds())
		const pauses = clock.sleeps.slice(0, -1) // the last one is cut to the end of the budget
		assert.ok(pauses.length > 20)
		pauses.forEach((pause, n) => assert.ok(pause >= 0 && pause < Math.min(2_000, 50 * 2 ** n), `pause ${n} is ${pause} ms`))
		assert.ok(new Set(pauses.slice(6)).size > 5, 'pauses at the cap are not all alike')
		assert.ok(clock.sleeps.at(-1)! <= pauseCeiling(clock.sleeps.length - 1, store.retry))
	})

	it('are told to the logger with the attempt, the pause and the time so far', async () => {
		const clock = new VirtualClock(() => 0.5)
		const told: Record<string, unknown>[] = []
		const { store } = client(clock, (n) => (n < 3 ? { service: 503 } : ok('keys.set')), { logger: { warn: (obj) => void told.push(obj as Record<string, unknown>) } })
		await store.setKeys({ session: { 'a.0': null } })
		assert.deepEqual(
			told.map(({ op, code, attempt, pauseMs, elapsedMs }) => ({ op, code, attempt, pauseMs, elapsedMs })),
			[
				{ op: 'keys.set', code: 503, attempt: 1, pauseMs: 25, elapsedMs: 0 },
				{ op: 'keys.set', code: 503, attempt: 2, pauseMs: 50, elapsedMs: 25 },
				{ op: 'keys.set', code: 503, attempt: 3, pauseMs: 100, elapsedMs: 75 }
			]
		)
	})
})

describe('which failures are retried', () => {
	const retried: [string, Outcome, number | string][] = [
		['a time-out', { nats: 'TIMEOUT' }, 'TIMEOUT'],
		['no responders', { nats: '503' }, 'NO_RESPONDERS'],
		['a lost connection', { nats: 'DISCONNECT' }, 'DISCONNECTED'],
		['a closed connection', { nats: 'CONNECTION_CLOSED' }, 'CLOSED'],
		['409 conflict', { service: 409 }, 409],
		['503 unavailable', { service: 503 }, 503],
		['504 timeout', { service: 504 }, 504]
	]
	for (const [what, failure, code] of retried) {
		it(`${what} (${code}) is retried, for reads and writes`, async () => {
			for (const [op, call] of Object.entries(OPS)) {
				const clock = new VirtualClock()
				const { store, attempts } = client(clock, (n) => (n < 3 ? failure : ok(op)))
				await call(store)
				assert.equal(attempts.length, 4, op)
				assert.equal(new BaileysStoreError(code as never, op, '').retryable, true)
			}
		})
	}

	const refused: [string, Outcome, number | string][] = [
		['400 bad request', { service: 400 }, 400],
		['404 unknown op', { service: 404 }, 404],
		['413 too large', { service: 413 }, 413],
		['422 invalid id', { service: 422 }, 422],
		['500 internal', { service: 500 }, 500],
		['520 unreadable', { service: 520 }, 520],
		['an undecodable reply', { reply: { creds: 'not bin', values: 'not a map', seq: 'x' } }, 'BAD_REPLY'],
		['a request over max_payload', { nats: 'MAX_PAYLOAD_EXCEEDED' }, 'TOO_LARGE'],
		['a permissions violation', { nats: 'PERMISSIONS_VIOLATION' }, 'NATS'],
		['a draining connection', { nats: 'CONNECTION_DRAINING' }, 'NATS']
	]
	for (const [what, failure, code] of refused) {
		it(`${what} surfaces at once, for reads and writes`, async () => {
			for (const [op, call] of Object.entries(OPS)) {
				if (op === 'session.info' && code === 'BAD_REPLY') continue // info hands the reply over as it is
				const clock = new VirtualClock()
				const { store, attempts } = client(clock, (n) => (n === 0 ? failure : ok(op)))
				const err = await caught(call(store))
				assert.equal(err.code, code, op)
				assert.equal(err.retryable, false)
				assert.equal(attempts.length, 1, `${op} was tried ${attempts.length} times`)
				assert.deepEqual(clock.sleeps, [])
			}
		})
	}
})

describe('retry options', () => {
	it('retryBudgetMs changes how long the client keeps trying', async () => {
		for (const budget of [0, 1_000, 120_000]) {
			const clock = new VirtualClock()
			const { store, attempts } = client(clock, () => ({ nats: '503' }), { retryBudgetMs: budget })
			await caught(store.info())
			assert.equal(clock.t, budget)
			assert.equal(attempts.at(-1)!.t, budget)
			if (budget === 0) assert.equal(attempts.length, 1)
		}
	})

	it('retries caps the number of retries within the budget', async () => {
		const clock = new VirtualClock()
		const { store, attempts } = client(clock, () => ({ service: 503 }), { retries: 3 })
		await caught(store.deleteSession())
		assert.equal(attempts.length, 4)
		assert.ok(clock.t < 30_000)
	})

	it('retryDelayMs and maxRetryDelayMs set the ceilings', async () => {
		const clock = new VirtualClock(() => 0.999999)
		const { store } = client(clock, (n) => (n < 5 ? { nats: '503' } : ok('creds.get')), { retryDelayMs: 10, maxRetryDelayMs: 35 })
		await store.getCreds()
		assert.deepEqual(
			clock.sleeps.map((p) => Math.round(p)),
			[10, 20, 35, 35, 35]
		)
	})

	it('refuses negative values', () => {
		for (const bad of [{ retryBudgetMs: -1 }, { retries: -1 }, { retryDelayMs: Number.NaN }, { maxRetryDelayMs: -5 }]) {
			assert.throws(() => new RetryPolicy(bad), RangeError)
		}
	})
})

/**
 * The session's writer claim, and what this client may answer from memory while it holds it.
 *
 * A Baileys socket is the only writer of its session, so most of its reads could be answered from
 * what it read and wrote before — including "not stored" for ids it asked for and did not find —
 * but only as long as nobody else writes. The service says so with a claim (`session.claim`,
 * docs/protocol.md): while the claim's lease runs, no other claim is granted and no write without
 * it is applied, and the service stops renewing a claim as soon as another writer asks to come in.
 * The lease is counted here from when the request that granted or renewed it was *sent*, by this
 * process's monotonic clock, less a margin: the service counts it from when it handled that
 * request, later. So once another writer may have changed the session, this client has stopped
 * answering from memory; no clock of another machine is ever read.
 *
 * What is known is kept per key type and id with the `seq` it was learned at (a value, or null for
 * "not stored"), so that a reply that overtook another (a retry, parallel requests) never
 * replaces newer knowledge with older. It is used only while the lease is valid, dropped for good
 * when the claim is superseded (410) or the session is deleted, and dropped after any failed write
 * (whose outcome is unknown). Without a valid lease every read goes to the service, as without
 * claims. Against a service that does not know `session.claim` (404) nothing is ever cached.
 */
import { performance } from 'node:perf_hooks'
import { type BaileysStoreClient, type EncodedKeyData, newRid, type Written } from './client.js'
import { BaileysStoreError } from './errors.js'

/** What is known of one id: its value, or null for "not stored", and the `seq` it was learned at. */
interface Known {
	value: Uint8Array | null
	seq: number
}

/** Where the claim stands. */
type State =
	/** Not asked yet, or asking again is due at `retryAt`. */
	| 'none'
	/** A `session.claim` for a new claim is on its way. */
	| 'asking'
	/** Holding `id`; usable while `performance.now() < validUntil`. */
	| 'held'
	/** The service knows no claims: never cache. */
	| 'off'

/** How long a superseded client waits before it claims again: the other writer is likely a newer socket. */
const SUPERSEDED_BACKOFF_LEASES = 10

export class SessionClaim {
	private state: State = 'none'
	private id: string | undefined
	/** Bumped whenever what is known is dropped or the claim changes: replies to older requests are not kept. */
	private gen = 0
	private validUntil = 0
	private leaseMs = 0
	/** Earliest time to ask for a claim again. */
	private retryAt = 0
	/** Whether anything was read or written since the last renewal: an idle client lets its lease lapse. */
	private used = false
	private renewing = false
	/** The request for a new claim on its way, if any. */
	private asking: Promise<void> | undefined
	private timer: ReturnType<typeof setInterval> | undefined
	private readonly known = new Map<string, Map<string, Known>>()
	/**
	 * Figures for tests and benchmarks: `keys.get` calls answered from memory and sent, claims
	 * granted, renewals, claims found superseded, and every request this client sent (reads, writes,
	 * `session.claim`).
	 */
	readonly stats = { fromMemory: 0, toService: 0, claims: 0, renewals: 0, superseded: 0, requests: 0 }

	constructor(
		private readonly store: BaileysStoreClient,
		private readonly now: () => number = () => performance.now()
	) {}

	/** The claim currently held, valid or not: writes carry it (and renew it). */
	get claimId(): string | undefined {
		return this.state === 'held' ? this.id : undefined
	}

	/** Whether reads may be answered from memory now. */
	valid(): boolean {
		return this.state === 'held' && this.now() < this.validUntil
	}

	/**
	 * The values of `ids` under `type`, from memory for the ids known while the lease is valid,
	 * from the service for the rest (and everything otherwise). Ids not stored are left out.
	 */
	async get(type: string, ids: string[]): Promise<Record<string, Uint8Array>> {
		this.touch()
		const out: Record<string, Uint8Array> = {}
		let missing = ids
		if (this.valid()) {
			const known = this.known.get(type)
			if (known) {
				missing = []
				for (const id of ids) {
					const k = known.get(id)
					if (k === undefined) missing.push(id)
					else if (k.value !== null) out[id] = k.value
				}
			}
			if (missing.length === 0) {
				this.stats.fromMemory++
				return out
			}
		}
		this.stats.toService++
		const gen = this.gen
		const held = this.state === 'held'
		const chunks = await this.store.getKeyChunks(type, missing)
		this.stats.requests += chunks.length
		for (const chunk of chunks) {
			for (const id of chunk.ids) {
				const value = chunk.values[id]
				if (value !== undefined) out[id] = value
				// Kept only if asked under the claim still held: a read sent before it was granted may predate another writer's last write.
				if (held && gen === this.gen) this.learn(type, id, value ?? null, chunk.seq)
			}
		}
		return out
	}

	/** `keys.set` carrying the claim when one is held; what it wrote is known afterwards. */
	async set(data: EncodedKeyData): Promise<void> {
		await this.write(
			(claim, rid) => this.store.setKeysAs(data, claim, rid),
			(written) => {
				for (const [type, values] of Object.entries(data)) {
					for (const [id, value] of Object.entries(values ?? {})) this.learn(type, id, value ?? null, written.seq)
				}
			}
		)
	}

	/** `creds.put` carrying the claim when one is held (creds are not kept: Baileys reads them once). */
	async putCreds(creds: Uint8Array): Promise<void> {
		await this.write((claim, rid) => this.store.putCredsAs(creds, claim, rid))
	}

	/** `session.delete` carrying the claim when one is held; everything known is dropped. */
	async deleteSession(): Promise<void> {
		try {
			await this.write((claim, rid) => this.store.deleteSessionAs(claim, rid))
		} finally {
			this.forget()
		}
	}

	/** Stops the renewal timer and drops what is known; the claim lapses by itself. */
	close(): void {
		this.stopTimer()
		this.forget()
		this.state = 'off'
	}

	/**
	 * One write: with the claim if one is held (a success renews it), else without. A claim found
	 * superseded (410, nothing applied) is given up and the write sent again without it, with the
	 * same request id: an earlier attempt that timed out may have been applied, and is then
	 * answered as such. Any other failure leaves the write's outcome unknown: what is known is
	 * dropped. A write waits for a claim being asked for, so that it does not come in without the
	 * claim its own client is being granted (which would supersede it).
	 */
	private async write(send: (claim: string | undefined, rid: string) => Promise<Written | undefined>, learned?: (w: Written) => void): Promise<void> {
		this.touch()
		if (this.asking) await this.asking
		const rid = newRid()
		let claim = this.claimId
		let gen = this.gen
		let sentAt = this.now()
		let written: Written | undefined
		for (;;) {
			try {
				this.stats.requests++
				written = await send(claim, rid)
				break
			} catch (err) {
				if (claim !== undefined && err instanceof BaileysStoreError && err.code === 410) {
					if (gen === this.gen) this.superseded()
					claim = this.claimId
					gen = this.gen
					sentAt = this.now()
					continue
				}
				this.forget()
				throw err
			}
		}
		if (written === undefined) return
		if (gen !== this.gen) {
			// The claim changed while the write ran: what was learned meanwhile may predate it.
			this.forget()
			return
		}
		if (claim === undefined) return
		if (written.leaseMs !== undefined) this.extend(sentAt, written.leaseMs)
		learned?.(written)
	}

	private learn(type: string, id: string, value: Uint8Array | null, seq: number): void {
		let known = this.known.get(type)
		if (!known) {
			known = new Map()
			this.known.set(type, known)
		}
		const before = known.get(id)
		if (before === undefined || before.seq <= seq) known.set(id, { value, seq })
	}

	private forget(): void {
		this.known.clear()
		this.gen++
	}

	/** Marks use, and asks for or renews the claim when due. */
	private touch(): void {
		this.used = true
		const now = this.now()
		if (this.state === 'none' && now >= this.retryAt) this.asking = this.ask().finally(() => (this.asking = undefined))
		else if (this.state === 'held' && now >= this.validUntil) void this.renew()
	}

	private async ask(): Promise<void> {
		this.state = 'asking'
		const sentAt = this.now()
		let reply
		this.stats.requests++
		try {
			reply = await this.store.claim()
		} catch (err) {
			if (this.state !== 'asking') return
			if (err instanceof BaileysStoreError && err.code === 404) {
				// An older service: plain requests for ever.
				this.state = 'off'
				return
			}
			this.state = 'none'
			this.retryAt = this.now() + 3000
			return
		}
		if (this.state !== 'asking') return
		if (reply.claim === null) {
			this.state = 'none'
			this.retryAt = this.now() + reply.waitMs
			return
		}
		this.forget()
		this.state = 'held'
		this.id = reply.claim
		this.stats.claims++
		this.extend(sentAt, reply.leaseMs)
		this.startTimer()
	}

	private async renew(): Promise<void> {
		if (this.renewing || this.state !== 'held' || this.id === undefined) return
		this.renewing = true
		this.used = false
		const gen = this.gen
		const sentAt = this.now()
		this.stats.requests++
		try {
			const reply = await this.store.claim(this.id)
			if (gen === this.gen && this.state === 'held') {
				this.stats.renewals++
				this.extend(sentAt, reply.leaseMs)
			}
		} catch (err) {
			// 410: another writer came. Anything else: the lease lapses by itself, and what is known stays
			// for a later renewal to vouch for (a renewal succeeds only if nobody else came in meanwhile).
			if (gen === this.gen && err instanceof BaileysStoreError && err.code === 410) this.superseded()
		} finally {
			this.renewing = false
		}
	}

	/** The lease as this client counts it: from `sentAt`, less a tenth (at least 100 ms) for clock rates. */
	private extend(sentAt: number, leaseMs: number): void {
		const margin = Math.max(100, leaseMs / 10)
		this.validUntil = Math.max(this.validUntil, sentAt + leaseMs - margin)
		if (leaseMs !== this.leaseMs) {
			this.leaseMs = leaseMs
			if (this.timer !== undefined) {
				this.stopTimer()
				this.startTimer()
			}
		}
	}

	private superseded(): void {
		this.stats.superseded++
		this.stopTimer()
		this.forget()
		this.state = 'none'
		this.id = undefined
		this.validUntil = 0
		this.retryAt = this.now() + SUPERSEDED_BACKOFF_LEASES * Math.max(this.leaseMs, 1000)
	}

	/** Renews every third of the lease while the client is in use; an idle one lets it lapse and renews on its next use. */
	private startTimer(): void {
		if (this.timer !== undefined) return
		this.timer = setInterval(
			() => {
				if (this.used) void this.renew()
			},
			Math.max(50, this.leaseMs / 3)
		)
		this.timer.unref()
	}

	private stopTimer(): void {
		if (this.timer !== undefined) clearInterval(this.timer)
		this.timer = undefined
	}
}

import { initAuthCreds, proto } from '@whiskeysockets/baileys'
import type { AuthenticationCreds, AuthenticationState, SignalDataSet, SignalDataTypeMap, SignalKeyStore } from '@whiskeysockets/baileys'
import type { NatsConnection } from 'nats'
import { SessionClaim } from './claim.js'
import { BaileysStoreClient, type EncodedKeyData, type StoreOptions } from './client.js'
import { decodeValue, encodeValue } from './codec.js'
import { BaileysStoreError } from './errors.js'

/**
 * Baileys' key store with enumeration: `list` and `listIds`, which Baileys' development line adds
 * to `SignalKeyStore` as optional methods (its `migrateAuthState` reads a whole store through
 * them). Both page through `keys.list` in byte order of the ids, one request per page, so a type
 * of any size streams without being held in memory at once.
 */
export type EnumerableSignalKeyStore = SignalKeyStore & {
	/** Every `[id, value]` stored under `type`; a key deleted while the listing runs may be left out. */
	list<T extends keyof SignalDataTypeMap>(type: T): AsyncIterable<readonly [id: string, value: SignalDataTypeMap[T]]>
	/** Every id stored under `type`, without reading the values. */
	listIds<T extends keyof SignalDataTypeMap>(type: T): AsyncIterable<string>
}

export interface NatsAuthState {
	state: AuthenticationState & { keys: EnumerableSignalKeyStore }
	/** Writes the whole creds object as it is at the time of the call. */
	saveCreds: () => Promise<void>
	/** Deletes the creds and every key of the session (logout). */
	clear: () => Promise<void>
	/** The request layer, e.g. for `store.info()`. */
	store: BaileysStoreClient
	/**
	 * The session's writer claim and what is answered from memory under it (`options.claim`,
	 * default on); undefined when it is off. Its `stats` count reads answered from memory and sent.
	 */
	claim: SessionClaim | undefined
	/**
	 * Stops the claim's renewal timer and stops answering from memory (the claim lapses by itself
	 * within its lease). For a socket that is closed while its process goes on; the timer never
	 * keeps a process alive.
	 */
	close: () => void
}

/**
 * Baileys auth state kept in baileys-store: a drop-in for `useMultiFileAuthState(folder)`.
 *
 * ```ts
 * const { state, saveCreds } = await useNatsAuthState(nc, { tenant: 'acme', session: 'bot-1' })
 * const sock = makeWASocket({ auth: { creds: state.creds, keys: makeCacheableSignalKeyStore(state.keys, logger) } })
 * sock.ev.on('creds.update', saveCreds)
 * ```
 */
export async function useNatsAuthState(nc: NatsConnection, options: StoreOptions): Promise<NatsAuthState> {
	const store = new BaileysStoreClient(nc, options)
	const claim = options.claim === false ? undefined : new SessionClaim(store)
	const stored = await store.getCreds()
	// New creds are not written until the app calls saveCreds, as with useMultiFileAuthState.
	const creds = stored ? (decodeStored('creds.get', 'creds', stored) as AuthenticationCreds) : initAuthCreds()

	const decodeKey = <T extends keyof SignalDataTypeMap>(type: T, id: string, bytes: Uint8Array): SignalDataTypeMap[T] => {
		let value = decodeStored('keys.get', `${type}/${id}`, bytes)
		// Same as useMultiFileAuthState: Baileys expects the protobuf object here (its timestamp may be a Long).
		if (type === 'app-state-sync-key') value = proto.Message.AppStateSyncKeyData.fromObject(value as object)
		return value as SignalDataTypeMap[T]
	}

	// The pages of `keys.list`, each as one array of ids; a cursor that does not move forward is a bad reply, not a loop.
	async function* pages(type: string): AsyncGenerator<string[]> {
		let after: string | undefined
		for (;;) {
			const page = await store.listKeys(type, after)
			if (page.ids.length > 0) yield page.ids
			if (page.next === null) return
			if (after !== undefined && !(Buffer.compare(Buffer.from(page.next), Buffer.from(after)) > 0)) {
				throw new BaileysStoreError('BAD_REPLY', 'keys.list', 'the cursor did not move forward')
			}
			after = page.next
		}
	}

	const keys: EnumerableSignalKeyStore = {
		async get<T extends keyof SignalDataTypeMap>(type: T, ids: string[]) {
			const found = claim ? await claim.get(type, ids) : await store.getKeys(type, ids)
			const out: { [id: string]: SignalDataTypeMap[T] } = {}
			for (const [id, bytes] of Object.entries(found)) out[id] = decodeKey(type, id, bytes)
			return out
		},
		async *listIds<T extends keyof SignalDataTypeMap>(type: T): AsyncGenerator<string> {
			for await (const ids of pages(type)) yield* ids
		},
		async *list<T extends keyof SignalDataTypeMap>(type: T): AsyncGenerator<readonly [id: string, value: SignalDataTypeMap[T]]> {
			for await (const ids of pages(type)) {
				// The values of one page in one keys.get (split further by the client if they are large).
				const found = await store.getKeys(type, ids)
				for (const id of ids) {
					// Not there: deleted since the page was read.
					if (!Object.hasOwn(found, id)) continue
					yield [id, decodeKey(type, id, found[id] as Uint8Array)] as const
				}
			}
		},
		async set(data: SignalDataSet) {
			// Encoded before any await: Baileys may change these objects right after calling set.
			const encoded: EncodedKeyData = {}
			for (const [type, values] of Object.entries(data)) {
				if (!values) continue
				const out: Record<string, Uint8Array | null> = {}
				for (const [id, value] of Object.entries(values)) {
					out[id] = value === null || value === undefined ? null : encodeValue(value)
				}
				encoded[type] = out
			}
			if (claim) await claim.set(encoded)
			else await store.setKeys(encoded)
		}
	}

	// Writes go out one after another so that an older snapshot can never land after a newer one.
	let lastWrite: Promise<unknown> = Promise.resolve()
	const saveCreds = (): Promise<void> => {
		let bytes: Uint8Array
		try {
			bytes = encodeValue(creds) // the snapshot, taken now
		} catch (err) {
			return Promise.reject(err)
		}
		const put = async (): Promise<void> => {
			if (claim) await claim.putCreds(bytes)
			else await store.putCreds(bytes)
		}
		const write = lastWrite.then(put)
		lastWrite = write.catch(() => undefined)
		return write
	}

	const clear = async (): Promise<void> => {
		await lastWrite
		if (claim) await claim.deleteSession()
		else await store.deleteSession()
	}

	return { state: { creds, keys }, saveCreds, clear, store, claim, close: () => claim?.close() }
}

function decodeStored(op: string, what: string, bytes: Uint8Array): unknown {
	try {
		return decodeValue(bytes)
	} catch (err) {
		throw new BaileysStoreError('BAD_REPLY', op, `stored ${what} could not be decoded`, { cause: err })
	}
}

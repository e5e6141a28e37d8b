import { initAuthCreds, proto } from '@whiskeysockets/baileys'
import type { AuthenticationCreds, AuthenticationState, SignalDataSet, SignalDataTypeMap, SignalKeyStore } from '@whiskeysockets/baileys'
import type { NatsConnection } from 'nats'
import { BaileysStoreClient, type EncodedKeyData, type StoreOptions } from './client.js'
import { decodeValue, encodeValue } from './codec.js'
import { BaileysStoreError } from './errors.js'

export interface NatsAuthState {
	state: AuthenticationState
	/** Writes the whole creds object as it is at the time of the call. */
	saveCreds: () => Promise<void>
	/** Deletes the creds and every key of the session (logout). */
	clear: () => Promise<void>
	/** The request layer, e.g. for `store.info()`. */
	store: BaileysStoreClient
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
	const stored = await store.getCreds()
	// New creds are not written until the app calls saveCreds, as with useMultiFileAuthState.
	const creds = stored ? (decodeStored('creds.get', 'creds', stored) as AuthenticationCreds) : initAuthCreds()

	const keys: SignalKeyStore = {
		async get<T extends keyof SignalDataTypeMap>(type: T, ids: string[]) {
			const found = await store.getKeys(type, ids)
			const out: { [id: string]: SignalDataTypeMap[T] } = {}
			for (const [id, bytes] of Object.entries(found)) {
				let value = decodeStored('keys.get', `${type}/${id}`, bytes)
				// Same as useMultiFileAuthState: Baileys expects the protobuf object here (its timestamp may be a Long).
				if (type === 'app-state-sync-key') value = proto.Message.AppStateSyncKeyData.fromObject(value as object)
				out[id] = value as SignalDataTypeMap[T]
			}
			return out
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
			await store.setKeys(encoded)
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
		const write = lastWrite.then(() => store.putCreds(bytes)).then(() => undefined)
		lastWrite = write.catch(() => undefined)
		return write
	}

	const clear = async (): Promise<void> => {
		await lastWrite
		await store.deleteSession()
	}

	return { state: { creds, keys }, saveCreds, clear, store }
}

function decodeStored(op: string, what: string, bytes: Uint8Array): unknown {
	try {
		return decodeValue(bytes)
	} catch (err) {
		throw new BaileysStoreError('BAD_REPLY', op, `stored ${what} could not be decoded`, { cause: err })
	}
}

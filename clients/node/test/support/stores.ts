// Auth state factories for the Signal world: in memory, Baileys' file store, baileys-store.
import { join } from 'node:path'
import { initAuthCreds, type SignalDataSet, type SignalKeyStore, useMultiFileAuthState } from '@whiskeysockets/baileys'
import type { NatsConnection } from 'nats'
import { type NatsAuthState, type StoreOptions, useNatsAuthState } from '../../src/index.js'
import type { AuthHandle, OpenAuth } from './signal-world.js'

/** Values kept as they are, like a Map in the bot's memory. Reopening gives the same state. */
export function memoryStore(): OpenAuth {
	const opened = new Map<string, AuthHandle>()
	return async (device) => {
		let handle = opened.get(device)
		if (!handle) {
			const data = new Map<string, unknown>()
			const keys: SignalKeyStore = {
				async get(type, ids) {
					const out: Record<string, any> = {}
					for (const id of ids) {
						const v = data.get(`${type}/${id}`)
						if (v !== undefined) out[id] = v
					}
					return out
				},
				async set(set: SignalDataSet) {
					for (const [type, values] of Object.entries(set)) {
						for (const [id, v] of Object.entries(values ?? {})) {
							if (v === null || v === undefined) data.delete(`${type}/${id}`)
							else data.set(`${type}/${id}`, v)
						}
					}
				}
			}
			handle = { state: { creds: initAuthCreds(), keys }, saveCreds: async () => {} }
			opened.set(device, handle)
		}
		return handle
	}
}

/** Baileys' own useMultiFileAuthState, one folder per device. */
export function fileStore(dir: string): OpenAuth {
	return (device) => useMultiFileAuthState(join(dir, device))
}

/** Sizes of every keys.set, to check how Baileys' writes reach the store. */
export interface SetLog {
	sets: { types: string[]; ids: number }[]
}

/** baileys-store, one session per device. */
export function natsStore(nc: NatsConnection, options: Omit<StoreOptions, 'session'>, log?: SetLog, opened?: NatsAuthState[]): OpenAuth {
	return async (device) => {
		const auth = await useNatsAuthState(nc, { ...options, session: device })
		opened?.push(auth)
		const { state, saveCreds } = auth
		if (log) {
			const set = state.keys.set.bind(state.keys)
			state.keys.set = (data) => {
				const types = Object.keys(data)
				const ids = Object.values(data).reduce((n, v) => n + Object.keys(v ?? {}).length, 0)
				log.sets.push({ types, ids })
				return set(data)
			}
		}
		return { state, saveCreds }
	}
}

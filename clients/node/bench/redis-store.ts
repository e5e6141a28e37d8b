// A Redis-direct auth state, written the way the popular npm Redis stores for Baileys do it:
// one hash per session, one field per key (`<type>-<id>`) plus `creds`, values as
// JSON text through Baileys' BufferJSON replacer and reviver. A `get` is one HMGET; a
// `set` is one pipeline of HSET (every written field) and HDEL (every deleted field).
// Nothing is sealed, no write is fenced: it is the baseline bot authors use today.
import { type AuthenticationCreds, BufferJSON, initAuthCreds, proto, type SignalDataSet, type SignalDataTypeMap, type SignalKeyStore } from '@whiskeysockets/baileys'
import type { Redis } from 'ioredis'
import type { AuthHandle, OpenAuth } from '../test/support/signal-world.js'

const field = (type: string, id: string) => `${type}-${id}`

/** One hash per device at `<prefix>:<device>`. */
export function redisStore(redis: Redis, prefix: string): OpenAuth {
	return async (device): Promise<AuthHandle> => {
		const hash = `${prefix}:${device}`
		const stored = await redis.hget(hash, 'creds')
		const creds: AuthenticationCreds = stored ? JSON.parse(stored, BufferJSON.reviver) : initAuthCreds()
		const keys: SignalKeyStore = {
			async get<T extends keyof SignalDataTypeMap>(type: T, ids: string[]) {
				const out: { [id: string]: SignalDataTypeMap[T] } = {}
				if (ids.length === 0) return out
				const values = await redis.hmget(
					hash,
					...ids.map((id) => field(type, id))
				)
				ids.forEach((id, i) => {
					const text = values[i]
					if (text === null || text === undefined) return
					let value = JSON.parse(text, BufferJSON.reviver)
					if (type === 'app-state-sync-key') value = proto.Message.AppStateSyncKeyData.fromObject(value)
					out[id] = value
				})
				return out
			},
			async set(data: SignalDataSet) {
				const written: Record<string, string> = {}
				const deleted: string[] = []
				for (const [type, values] of Object.entries(data)) {
					for (const [id, value] of Object.entries(values ?? {})) {
						if (value === null || value === undefined) deleted.push(field(type, id))
						else written[field(type, id)] = JSON.stringify(value, BufferJSON.replacer)
					}
				}
				const pipeline = redis.pipeline()
				if (Object.keys(written).length) pipeline.hset(hash, written)
				if (deleted.length) pipeline.hdel(hash, ...deleted)
				if (pipeline.length === 0) return
				const results = await pipeline.exec()
				for (const [err] of results ?? []) if (err) throw err
			}
		}
		const saveCreds = async () => {
			await redis.hset(hash, 'creds', JSON.stringify(creds, BufferJSON.replacer))
		}
		return { state: { creds, keys }, saveCreds }
	}
}

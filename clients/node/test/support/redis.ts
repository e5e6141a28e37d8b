// A private redis-server for tests, and Redis-direct auth stores laid out as the npm Redis
// stores for Baileys lay them out, for moving bots between those and baileys-store.
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type AuthenticationCreds, BufferJSON, initAuthCreds, proto, type SignalDataSet, type SignalKeyStore } from '@whiskeysockets/baileys'
import { Redis } from 'ioredis'
import type { AuthHandle, OpenAuth } from './signal-world.js'

function freePort(): Promise<number> {
	return new Promise((resolve, reject) => {
		const srv = createServer()
		srv.once('error', reject)
		srv.listen(0, '127.0.0.1', () => {
			const port = (srv.address() as { port: number }).port
			srv.close(() => resolve(port))
		})
	})
}

/** redis-server ($REDIS_SERVER_BIN or on the PATH) on a free loopback port, without persistence. */
export class RedisServer {
	private constructor(
		readonly url: string,
		private readonly child: ChildProcess,
		private readonly dir: string
	) {}

	static async start(): Promise<RedisServer> {
		const dir = mkdtempSync(join(tmpdir(), 'bstore-redis-'))
		const port = await freePort()
		const bin = process.env.REDIS_SERVER_BIN ?? 'redis-server'
		const child = spawn(bin, ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', 'no'], {
			stdio: 'ignore'
		})
		const url = `redis://127.0.0.1:${port}`
		const deadline = Date.now() + 10_000
		for (;;) {
			const probe = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null })
			probe.on('error', () => {}) // not up yet: tried again below
			try {
				await probe.connect()
				await probe.ping()
				probe.disconnect()
				return new RedisServer(url, child, dir)
			} catch {
				probe.disconnect()
				if (Date.now() > deadline || child.exitCode !== null) throw new Error(`redis-server (${bin}) did not start`)
				await new Promise((r) => setTimeout(r, 50))
			}
		}
	}

	/** A client of database `db`. */
	client(db = 0): Redis {
		return new Redis(`${this.url}/${db}`)
	}

	async stop(): Promise<void> {
		if (this.child.exitCode === null) {
			const exited = new Promise((r) => this.child.once('exit', r))
			this.child.kill('SIGTERM')
			await exited
		}
		rmSync(this.dir, { recursive: true, force: true })
	}
}

/** Where a Redis-direct store keeps one device and how it names fields. */
export interface HashLayout {
	/** The hash of a device. */
	hash: (device: string) => string
	/** Ids in field names escaped as useMultiFileAuthState escapes file names. */
	escaped: boolean
}

/**
 * baileys-redis-auth 2.x, `useRedisAuthStateWithHSet(options, device)`: the hash
 * `<device>:auth`, ids escaped as file names (`/` as `__`, `:` as `-`).
 */
export const BAILEYS_REDIS_AUTH: HashLayout = { hash: (device) => `${device}:auth`, escaped: true }

/**
 * A Redis-direct auth state, one hash per device, read and written as baileys-redis-auth's
 * `useRedisAuthStateWithHSet` does: fields `creds` and `<type>-<id>`, each value the text
 * `JSON.stringify(value, BufferJSON.replacer)`, read back with `BufferJSON.reviver`; a key
 * set to a falsy value is removed; app-state-sync keys come back as protobuf objects.
 */
export function redisHashStore(redis: Redis, layout: HashLayout): OpenAuth {
	const field = (type: string, id: string) => `${type}-${layout.escaped ? id.replace(/\//g, '__').replace(/:/g, '-') : id}`
	return async (device): Promise<AuthHandle> => {
		const hash = layout.hash(device)
		const read = async (name: string): Promise<unknown> => {
			const text = await redis.hget(hash, name)
			return text ? JSON.parse(text, BufferJSON.reviver) : null
		}
		const creds = ((await read('creds')) as AuthenticationCreds | null) || initAuthCreds()
		const keys: SignalKeyStore = {
			async get(type, ids) {
				const out: Record<string, any> = {}
				await Promise.all(
					ids.map(async (id) => {
						const value = await read(field(type, id))
						if (!value) return
						out[id] = type === 'app-state-sync-key' ? proto.Message.AppStateSyncKeyData.fromObject(value as object) : value
					})
				)
				return out
			},
			async set(data: SignalDataSet) {
				const writes: Promise<unknown>[] = []
				for (const [type, values] of Object.entries(data)) {
					for (const [id, value] of Object.entries(values ?? {})) {
						const name = field(type, id)
						writes.push(value ? redis.hset(hash, name, JSON.stringify(value, BufferJSON.replacer)) : redis.hdel(hash, name))
					}
				}
				await Promise.all(writes)
			}
		}
		const saveCreds = async () => {
			await redis.hset(hash, 'creds', JSON.stringify(creds, BufferJSON.replacer))
		}
		return { state: { creds, keys }, saveCreds }
	}
}

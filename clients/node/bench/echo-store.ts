// The round trip alone: values kept in the bot's memory, as the in-memory store keeps them, but
// every get and set also goes through useNatsAuthState over NATS to a responder, in a process of
// its own, that answers at once without looking at the request (a get finds nothing there). Set
// beside the in-memory store and baileys-store, it splits what baileys-store costs into what any
// request over the network costs the bot (this store) and what the service and JetStream add.
import { type ChildProcess, spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import type { SignalDataSet, SignalKeyStore } from '@whiskeysockets/baileys'
import { encode } from '@msgpack/msgpack'
import { connect, type NatsConnection } from 'nats'
import { useNatsAuthState } from '../src/index.js'
import type { OpenAuth } from '../test/support/signal-world.js'
import { memoryStore } from '../test/support/stores.js'

/** The subject prefix the responder answers under. */
const PREFIX = 'bench-echo'

/** One memory store whose reads and writes each also go through useNatsAuthState to the echo responder. */
export function echoStore(nc: NatsConnection, label: string): OpenAuth {
	const memory = memoryStore()
	return async (device) => {
		const inner = await memory(device)
		const session = `${label}-${device}`.replace(/[^A-Za-z0-9_-]/g, '_')
		const { state } = await useNatsAuthState(nc, { prefix: PREFIX, tenant: 'echo', session })
		const keys: SignalKeyStore = {
			async get(type, ids) {
				await state.keys.get(type, ids)
				return inner.state.keys.get(type, ids)
			},
			async set(data: SignalDataSet) {
				await state.keys.set(data)
				await inner.state.keys.set(data)
			}
		}
		return { state: { creds: inner.state.creds, keys }, saveCreds: inner.saveCreds }
	}
}

/** Starts the responder (this file, run as a script) against `url`; resolves once it listens. */
export async function startEchoResponder(url: string): Promise<ChildProcess> {
	const child = spawn(process.execPath, [fileURLToPath(import.meta.url), url], { stdio: ['ignore', 'pipe', 'inherit'] })
	await new Promise<void>((resolve, reject) => {
		child.once('exit', (code) => reject(new Error(`echo responder exited with ${code}`)))
		child.stdout!.once('data', () => resolve())
	})
	return child
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
	const nc = await connect({ servers: process.argv[2]! })
	// What the service answers to a keys.get that finds nothing, and to a write.
	const found = encode({ values: {}, seq: 1 })
	const written = encode({ seq: 1 })
	nc.subscribe(`${PREFIX}.>`, { callback: (_err, msg) => msg.respond(msg.subject.endsWith('.keys.get') ? found : written) })
	await nc.flush()
	process.stdout.write('ready\n')
}

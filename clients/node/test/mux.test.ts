// The client's request multiplexer (one reply subscription per connection, one timer) against a
// real nats-server, with a stand-in for the service answering in this process. The bot's user
// may subscribe only under its own inbox prefix and publish only to its tenant's subjects, as
// docs/deploy.md configures bots; the stand-in can answer late, never, or with an error.
import assert from 'node:assert/strict'
import { after, before, describe, it } from 'node:test'
import { performance } from 'node:perf_hooks'
import { decode, encode } from '@msgpack/msgpack'
import { connect, headers, type Msg, type NatsConnection } from 'nats'
import { BaileysStoreClient, BaileysStoreError } from '../src/index.js'
import { NatsServer } from './support/servers.js'

const INBOX = '_INBOX.bot1'
const config = `authorization {
	users = [
		{ user: svc, password: svc }
		{ user: bot, password: bot, permissions: { publish: { allow: ["bstore.acme.>", "nobody.>", "later.>"] }, subscribe: { allow: ["${INBOX}.>"] } } }
	]
}`

let nats: NatsServer
/** The stand-in service's connection. */
let svc: NatsConnection
/** The bot's connection, confined to its inbox prefix. */
let bot: NatsConnection
/** Requests of the session `late`, by rid: the first attempt of each is held back. */
const held = new Map<string, Msg>()

const botConnection = (extra: object = {}) =>
	connect({ servers: nats.url, user: 'bot', pass: 'bot', inboxPrefix: INBOX, name: 'bot-under-test', maxReconnectAttempts: -1, reconnectTimeWait: 100, ...extra })

const reply = (msg: Msg, body: object) => msg.respond(encode(body))

/** The stand-in: `bstore.acme.<session>.<op>`. */
async function serve(msg: Msg): Promise<void> {
	const [, , session, ...rest] = msg.subject.split('.')
	const op = rest.join('.')
	const body = (msg.data.length ? decode(msg.data) : {}) as { ids?: string[]; rid?: string }
	if (session === 'refuse') {
		const h = headers()
		h.set('Nats-Service-Error-Code', '503')
		h.set('Nats-Service-Error', 'partition not owned yet')
		msg.respond(new Uint8Array(0), { headers: h })
		return
	}
	if (session === 'late') {
		// First attempt: no answer yet. Second: answer the first (now timed out) before the second.
		const first = held.get(body.rid!)
		if (!first) {
			held.set(body.rid!, msg)
			return
		}
		reply(first, { seq: 111 })
		await svc.flush()
		reply(msg, { seq: 222 })
		return
	}
	if (op === 'keys.get') {
		if (body.ids!.includes('hole')) return // never answered
		reply(msg, { values: Object.fromEntries(body.ids!.map((id) => [id, Buffer.from(`${session}/${id}`)])), seq: 1 })
		return
	}
	reply(msg, { seq: 7 })
}

before(async () => {
	nats = await NatsServer.start(config)
	svc = await connect({ servers: nats.url, user: 'svc', pass: 'svc', maxReconnectAttempts: -1, reconnectTimeWait: 100 })
	svc.subscribe('bstore.acme.>', { callback: (err, msg) => void (err || serve(msg)) })
	await svc.flush()
	bot = await botConnection()
})

after(async () => {
	await bot?.close()
	await svc?.close()
	await nats?.stop()
})

async function rejection(p: Promise<unknown>): Promise<BaileysStoreError> {
	try {
		await p
	} catch (err) {
		assert.ok(err instanceof BaileysStoreError, `expected a BaileysStoreError, got ${String(err)}`)
		return err
	}
	assert.fail('expected a rejection')
}

/** The bot connection's subscriptions, as the server sees them. */
async function botSubscriptions(): Promise<string[]> {
	const connz = (await (await fetch(`${nats.monitorUrl}/connz?subs=1`)).json()) as { connections: { name?: string; subscriptions_list?: string[] }[] }
	const conns = connz.connections.filter((c) => c.name === 'bot-under-test')
	assert.equal(conns.length, 1)
	return conns[0]!.subscriptions_list ?? []
}

const opts = { tenant: 'acme', retries: 0 }

describe('request multiplexer', () => {
	it('demultiplexes many concurrent requests of several clients over one subscription under the inbox prefix', async () => {
		const stores = ['a', 'b', 'c'].map((session) => new BaileysStoreClient(bot, { ...opts, session }))
		const calls = Array.from({ length: 600 }, (_, i) => {
			const store = stores[i % 3]!
			const id = `id${i}`
			return store.getKeys('session', [id]).then((got) => ({ got, want: `${store.subjectBase.split('.')[2]}/${id}`, id }))
		})
		for (const { got, want, id } of await Promise.all(calls)) assert.equal(Buffer.from(got[id]!).toString(), want)
		const subs = await botSubscriptions()
		assert.equal(subs.length, 1, `subscriptions: ${subs.join(', ')}`)
		assert.match(subs[0]!, /^_INBOX\.bot1\.[A-Za-z0-9]+\.\*$/)
	})

	it('times out the one request that gets no reply, and only that one', async () => {
		const store = new BaileysStoreClient(bot, { ...opts, session: 'echo', timeoutMs: 300 })
		const t0 = performance.now()
		const hole = rejection(store.getKeys('session', ['hole']))
		const answered = Array.from({ length: 100 }, (_, i) => store.getKeys('session', [`k${i}`]))
		const got = await Promise.all(answered)
		got.forEach((g, i) => assert.equal(Buffer.from(g[`k${i}`]!).toString(), `echo/k${i}`))
		const err = await hole
		const waited = performance.now() - t0
		assert.equal(err.code, 'TIMEOUT')
		assert.equal(err.retryable, true)
		assert.equal(err.op, 'keys.get')
		assert.ok(waited >= 295, `timed out after ${waited.toFixed(0)} ms, before timeoutMs`)
		assert.ok(waited < 1500, `timed out after ${waited.toFixed(0)} ms`)
	})

	it('ignores a reply that comes after its request timed out, even while the retry waits', async () => {
		const store = new BaileysStoreClient(bot, { ...opts, session: 'late', timeoutMs: 300, retries: 1, retryDelayMs: 1 })
		// The stand-in answers the first attempt (seq 111) only once the retry has arrived, then the retry (seq 222).
		assert.equal(await store.setKeys({ session: { 'a.0': new Uint8Array([1]) } }), 222)
		// Nothing is left behind: the next request is answered by its own reply.
		const echo = new BaileysStoreClient(bot, { ...opts, session: 'echo' })
		assert.deepEqual(Object.keys(await echo.getKeys('session', ['x'])), ['x'])
	})

	it('maps no responders to NO_RESPONDERS (retryable) at once, and retries it until a responder comes', async () => {
		const nobody = new BaileysStoreClient(bot, { ...opts, session: 'ghost', prefix: 'nobody' })
		const t0 = performance.now()
		const err = await rejection(nobody.info())
		assert.equal(err.code, 'NO_RESPONDERS')
		assert.equal(err.retryable, true)
		assert.ok(performance.now() - t0 < 2000, 'no responders is known at once, not at the time-out')

		const later = new BaileysStoreClient(bot, { tenant: 'acme', session: 'ghost', prefix: 'later', retryDelayMs: 20, maxRetryDelayMs: 50 })
		const pending = later.info()
		await new Promise((r) => setTimeout(r, 200))
		const sub = svc.subscribe('later.acme.ghost.>', { callback: (_err, msg) => reply(msg, { seq: 1, exists: false }) })
		assert.equal((await pending).seq, 1)
		sub.unsubscribe()
	})

	it("keeps the service's own 503 apart from no responders", async () => {
		const err = await rejection(new BaileysStoreClient(bot, { ...opts, session: 'refuse' }).info())
		assert.equal(err.code, 503)
		assert.equal(err.message, 'session.info: partition not owned yet (503)')
	})

	it('reports a publish the user may not make at once, not as a time-out', async () => {
		const other = new BaileysStoreClient(bot, { tenant: 'other', session: 's', retries: 0, timeoutMs: 5000 })
		const t0 = performance.now()
		const err = await rejection(other.info())
		assert.equal(err.code, 'NATS')
		assert.equal(err.retryable, false)
		assert.match(err.message, /Permissions Violation for Publish/)
		assert.ok(performance.now() - t0 < 2000)
		// The connection and its subscription are unharmed.
		assert.equal((await new BaileysStoreClient(bot, { ...opts, session: 'echo' }).info()).seq, 7)
	})

	it('reports a reply subscription the user may not make (an inbox prefix not its own)', async () => {
		const wrong = await botConnection({ inboxPrefix: '_INBOX', name: 'bot-wrong-inbox' })
		try {
			const err = await rejection(new BaileysStoreClient(wrong, { ...opts, session: 'echo', timeoutMs: 5000 }).info())
			assert.equal(err.code, 'NATS')
			assert.match(err.message, /Permissions Violation for Subscription/)
		} finally {
			await wrong.close()
		}
	})

	it('fails waiting requests with CLOSED when the connection is closed, and every later one', async () => {
		const nc = await botConnection({ name: 'bot-closing' })
		const store = new BaileysStoreClient(nc, { ...opts, session: 'echo' })
		const waiting = rejection(store.getKeys('session', ['hole']))
		await nc.flush()
		await nc.close()
		assert.equal((await waiting).code, 'CLOSED')
		assert.equal((await rejection(store.info())).code, 'CLOSED')
	})

	it('goes on over the same subscription after nats-server restarts', async () => {
		const store = new BaileysStoreClient(bot, { tenant: 'acme', session: 'echo', timeoutMs: 500, retryDelayMs: 20, maxRetryDelayMs: 100 })
		assert.equal((await store.info()).seq, 7)
		const reconnected = (async () => {
			for await (const s of bot.status()) if (s.type === 'reconnect') return
		})()
		await nats.restart()
		// Sent while the connection is down or coming back: retried until the server and the stand-in are back.
		const got = await store.getKeys('session', ['after'])
		assert.equal(Buffer.from(got.after!).toString(), 'echo/after')
		await reconnected
		const subs = await botSubscriptions()
		assert.equal(subs.length, 1, `subscriptions: ${subs.join(', ')}`)
	})
})

// Moving bots in and out: devices talk on Baileys' own useMultiFileAuthState folders (or
// on a Redis-direct store laid out as baileys-redis-auth lays it out), the folders (or
// hashes) are imported with `baileys-store import`, the same devices go on through
// useNatsAuthState, and then an `export` of the store is opened by useMultiFileAuthState
// (or the Redis store) and they go on again. Every decrypt is checked and no pre-key bundle
// is fetched anew: the Signal sessions made outside carry over both ways.
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import type { NatsConnection } from 'nats'
import { BufferJSON } from '@whiskeysockets/baileys'
import { BaileysStoreClient, decodeValue, encodeValue } from '../src/index.js'
import { BAILEYS_REDIS_AUTH, RedisServer, redisHashStore } from './support/redis.js'
import { findServiceBinary, NatsServer, removeDir, Service, tempDir } from './support/servers.js'
import { type OpenAuth, World } from './support/signal-world.js'
import { fileStore, natsStore } from './support/stores.js'

const bin = findServiceBinary()
if (!bin) {
	throw new Error('baileys-store binary not found: build it (target/ci or target/debug) or set BSTORE_BIN')
}

const tenant = `m${randomBytes(4).toString('hex')}`
const options = { tenant, timeoutMs: 5000, retries: 5 }

let nats: NatsServer
let service: Service
let nc: NatsConnection
const dirs: string[] = []

before(async () => {
	nats = await NatsServer.start()
	nc = await nats.connect()
	service = new Service(bin, nats.url)
	await service.start(nc)
})

after(async () => {
	await nc?.close()
	await service?.dispose()
	await nats?.stop()
	for (const d of dirs) removeDir(d)
})

/** Runs the CLI against the test's service; stdout's JSON lines. */
function cli(args: string[]): Promise<Record<string, any>[]> {
	return new Promise((resolve, reject) => {
		const child = spawn(bin!, args, { env: service.env, stdio: ['ignore', 'pipe', 'pipe'] })
		let out = ''
		let err = ''
		child.stdout.on('data', (b) => (out += b))
		child.stderr.on('data', (b) => (err += b))
		child.on('exit', (code) => {
			if (code !== 0) reject(new Error(`baileys-store ${args.join(' ')} exited ${code}: ${err}`))
			else resolve(out.split('\n').filter(Boolean).map((l) => JSON.parse(l)))
		})
	})
}

/** Pre-keys the server still holds for hand-out: fetching a bundle takes one. */
function bundlesLeft(world: World): number {
	const bundles = (world as unknown as { bundles: Map<string, { preKeys: unknown[] }> }).bundles
	return [...bundles.values()].reduce((n, b) => n + b.preKeys.length, 0)
}

describe('moving between useMultiFileAuthState and baileys-store', () => {
	it('imported folders go on through the service, and an export goes on through files', async () => {
		const files = tempDir('bstore-mf-')
		const exported = tempDir('bstore-export-')
		dirs.push(files, exported)
		let current: OpenAuth = fileStore(files)
		const world = new World((device) => current(device))
		await world.setup()
		let round = 0
		const play = async (n: number) => {
			for (const end = round + n; round < end; round++) {
				await world.directRound(round)
				await world.groupRound(round)
			}
		}
		await play(2)
		assert.deepEqual(world.failures, [])
		const left = bundlesLeft(world)

		// Import every device's folder, each as its session.
		const reports = await cli(['import', '--tenant', tenant, '--all', '--from', files, '--json'])
		assert.deepEqual(
			reports.map((r) => [r.session, r.status, r.skipped.length]),
			world.devices.map((d) => [d.name, 'imported', 0])
		)
		for (const d of world.devices) {
			const folder = join(files, d.name)
			const keyFiles = readdirSync(folder).filter((f) => f !== 'creds.json').length
			const info = await new BaileysStoreClient(nc, { ...options, session: d.name }).info()
			assert.equal(info.creds, true)
			assert.equal(
				Object.values(info.keys).reduce((a, b) => a + b, 0),
				keyFiles,
				`${d.name}: every key file imported`
			)
		}
		// Each value is what useNatsAuthState stores for the object Baileys reads from the
		// file, byte for byte (file names un-escaped as fixFileName escaped them).
		const types = ['sender-key-memory', 'identity-key', 'device-list', 'lid-mapping', 'sender-key', 'pre-key', 'session']
		let compared = 0
		for (const d of world.devices) {
			const client = new BaileysStoreClient(nc, { ...options, session: d.name })
			const folder = join(files, d.name)
			const read = (f: string) => Buffer.from(encodeValue(JSON.parse(readFileSync(join(folder, f), 'utf8'), BufferJSON.reviver)))
			assert.deepEqual(Buffer.from((await client.getCreds()) ?? []), read('creds.json'), `${d.name} creds`)
			for (const f of readdirSync(folder).filter((f) => f !== 'creds.json')) {
				const type = types.find((t) => f.startsWith(`${t}-`))
				assert.ok(type, `known key type: ${f}`)
				const raw = f.slice(type.length + 1, -'.json'.length)
				const id = type === 'sender-key' ? raw.replaceAll('--', '::') : raw
				const got = await client.getKeys(type, [id])
				assert.deepEqual(Buffer.from(got[id] ?? []), read(f), `${d.name} ${type} ${id}`)
				compared++
			}
		}
		assert.ok(compared > 3000, `compared ${compared} keys`)
		// Importing again writes nothing.
		const again = await cli(['import', '--tenant', tenant, '--all', '--from', files, '--json'])
		assert.deepEqual(
			again.map((r) => r.status),
			world.devices.map(() => 'unchanged')
		)

		// The same devices, now on the service, every cache dropped.
		current = natsStore(nc, options)
		await world.reopen()
		const seqBefore = (await new BaileysStoreClient(nc, { ...options, session: 'bob-1' }).info()).seq
		await play(2)
		assert.deepEqual(world.failures, [])
		assert.equal(bundlesLeft(world), left, 'no pre-key bundle fetched after the import')
		const seqAfter = (await new BaileysStoreClient(nc, { ...options, session: 'bob-1' }).info()).seq
		assert.ok(seqAfter > seqBefore, 'the devices wrote through the service')

		// Out again: the export is opened by useMultiFileAuthState and traffic goes on.
		const out = await cli(['export', '--tenant', tenant, '--out', exported, '--json'])
		assert.deepEqual(out.map((r) => r.session).sort(), world.devices.map((d) => d.name).sort())
		const creds = JSON.parse(readFileSync(join(exported, 'bob-1', 'creds.json'), 'utf8'))
		assert.equal(creds.me.name, 'bob')
		current = fileStore(exported)
		await world.reopen()
		await play(2)
		assert.deepEqual(world.failures, [])
		assert.equal(bundlesLeft(world), left, 'no pre-key bundle fetched after the export')
		assert.equal(world.delivered, 6 * 21)
		assert.deepEqual(
			world.logger.problems.filter((p) => p.startsWith('error')),
			[]
		)
	})

	it('a Redis-direct hash store goes on through the service, and an exported hash goes on through Redis', async () => {
		const redis = await RedisServer.start()
		const source = redis.client(0)
		const target = redis.client(1)
		try {
			const tenant2 = `r${randomBytes(4).toString('hex')}`
			const options2 = { ...options, tenant: tenant2 }
			let current: OpenAuth = redisHashStore(source, BAILEYS_REDIS_AUTH)
			const world = new World((device) => current(device))
			await world.setup()
			let round = 0
			const play = async (n: number) => {
				for (const end = round + n; round < end; round++) {
					await world.directRound(round)
					await world.groupRound(round)
				}
			}
			await play(2)
			assert.deepEqual(world.failures, [])
			const left = bundlesLeft(world)

			// The layout is found: a hash `<device>:auth` per device.
			const reports = await cli(['import', '--tenant', tenant2, '--all', '--from-redis', `${redis.url}/0`, '--json'])
			assert.deepEqual(
				reports.map((r) => [r.session, r.status, r.from, r.skipped.length]),
				world.devices.map((d) => [d.name, 'imported', `redis hash ${d.name}:auth`, 0]).sort()
			)
			// Each value is what useNatsAuthState stores for the object the Redis store reads back.
			const types = ['sender-key-memory', 'identity-key', 'device-list', 'lid-mapping', 'sender-key', 'pre-key', 'session']
			let compared = 0
			for (const d of world.devices) {
				const client = new BaileysStoreClient(nc, { ...options2, session: d.name })
				const hash = await source.hgetall(`${d.name}:auth`)
				const stored = (text: string) => Buffer.from(encodeValue(JSON.parse(text, BufferJSON.reviver)))
				assert.deepEqual(Buffer.from((await client.getCreds()) ?? []), stored(hash.creds!), `${d.name} creds`)
				const info = await client.info()
				assert.equal(
					Object.values(info.keys).reduce((a, b) => a + b, 0),
					Object.keys(hash).length - 1,
					`${d.name}: every field imported`
				)
				for (const [field, text] of Object.entries(hash)) {
					if (field === 'creds') continue
					const type = types.find((t) => field.startsWith(`${t}-`))
					assert.ok(type, `known key type: ${field}`)
					const raw = field.slice(type.length + 1)
					const id = type === 'sender-key' ? raw.replaceAll('--', '::') : raw
					const got = await client.getKeys(type, [id])
					assert.deepEqual(Buffer.from(got[id] ?? []), stored(text), `${d.name} ${type} ${id}`)
					compared++
				}
			}
			assert.ok(compared > 3000, `compared ${compared} keys`)
			const again = await cli(['import', '--tenant', tenant2, '--all', '--from-redis', `${redis.url}/0`, '--layout', 'hash', '--json'])
			assert.deepEqual(
				again.map((r) => r.status),
				world.devices.map(() => 'unchanged')
			)

			// The same devices on the service, every cache dropped.
			current = natsStore(nc, options2)
			await world.reopen()
			const seqBefore = (await new BaileysStoreClient(nc, { ...options2, session: 'bob-1' }).info()).seq
			await play(2)
			assert.deepEqual(world.failures, [])
			assert.equal(bundlesLeft(world), left, 'no pre-key bundle fetched after the import')
			const seqAfter = (await new BaileysStoreClient(nc, { ...options2, session: 'bob-1' }).info()).seq
			assert.ok(seqAfter > seqBefore, 'the devices wrote through the service')

			// Out again, to hashes in another database, opened by the Redis store.
			const out = await cli(['export', '--tenant', tenant2, '--to-redis', `${redis.url}/1`, '--json'])
			assert.deepEqual(
				out.map((r) => [r.session, r.to]).sort(),
				world.devices.map((d) => [d.name, `${d.name}:auth`]).sort()
			)
			current = redisHashStore(target, BAILEYS_REDIS_AUTH)
			await world.reopen()
			await play(2)
			assert.deepEqual(world.failures, [])
			assert.equal(bundlesLeft(world), left, 'no pre-key bundle fetched after the export')
			assert.equal(world.delivered, 6 * 21)
			assert.deepEqual(
				world.logger.problems.filter((p) => p.startsWith('error')),
				[]
			)
		} finally {
			source.disconnect()
			target.disconnect()
			await redis.stop()
		}
	})

	it('stores what useNatsAuthState stores and writes what Baileys writes, for JSON at its corners', async () => {
		// Property order (index keys first), duplicate keys, the reviver's Buffer forms, numbers
		// of every MessagePack width and JavaScript's printing of them, escapes, long strings.
		const texts = [
			'{"b":1,"a":2,"10":3,"2":4,"b":5}',
			'{"n":[0,-0,1.5,-1e-7,1e21,123456789012345678,9007199254740993,-2147483649,4294967296,1e400,255,256,65536,-32,-33,-128,-129,-32769,0.1,5e-324]}',
			'{"s":"\\u00e9\\ud83d\\ude00\\n\\t\\u0001\\"\\\\\\/ \\u2028 é"}',
			'{"0":1,"1":300,"2":-1.7}',
			'{" 1":1,"+2":2,"3x":3}',
			'{"type":"Buffer","data":[1,2,300]}',
			'{"x":{"type":"Buffer","data":""},"y":{"type":"Buffer","data":"AQIDBA"}}',
			JSON.stringify({ long: 'x'.repeat(40), longer: 'y'.repeat(300), list: Array.from({ length: 20 }, (_, i) => i * 1000) }),
			JSON.stringify(Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`k${i}`, { deep: [[[i]]] }]))),
			'[]',
			'{}',
			'"just a string"',
			'[true,false,null,{"a":[]}]',
			' \n{ "spaced" : [ 1 , 2 ] }\t'
		]
		const folder = join(tempDir('bstore-corners-'), 'corners')
		dirs.push(folder)
		mkdirSync(folder, { recursive: true })
		writeFileSync(join(folder, 'creds.json'), texts[0]!)
		texts.forEach((t, i) => writeFileSync(join(folder, `pre-key-${i + 1}.json`), t))
		const [report] = await cli(['import', '--tenant', tenant, '--session', 'corners', '--from', folder, '--json'])
		assert.equal(report!.status, 'imported', JSON.stringify(report))
		assert.deepEqual(report!.skipped, [])
		const client = new BaileysStoreClient(nc, { ...options, session: 'corners' })
		const stored = await client.getKeys(
			'pre-key',
			texts.map((_, i) => String(i + 1))
		)
		const exported = tempDir('bstore-corners-out-')
		dirs.push(exported)
		await cli(['export', '--tenant', tenant, '--session', 'corners', '--out', exported])
		for (const [i, t] of texts.entries()) {
			const id = String(i + 1)
			const expected = Buffer.from(encodeValue(JSON.parse(t, BufferJSON.reviver)))
			assert.deepEqual(Buffer.from(stored[id]!), expected, `stored form of ${t}`)
			const written = JSON.stringify(decodeValue(stored[id]!), BufferJSON.replacer)
			assert.equal(readFileSync(join(exported, 'corners', `pre-key-${id}.json`), 'utf8'), written, `exported form of ${t}`)
		}
	})
})

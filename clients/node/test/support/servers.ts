// Starts a real nats-server (JetStream) and the baileys-store service for tests and the benchmark.
import { type ChildProcess, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { connect, type NatsConnection } from 'nats'
import { BaileysStoreClient } from '../../src/index.js'

/** clients/node, found from this file whether it runs from test/ or build/test/. */
function packageDir(): string {
	let dir = dirname(fileURLToPath(import.meta.url))
	while (!existsSync(join(dir, 'package.json'))) dir = dirname(dir)
	return dir
}
export const repoDir = resolve(packageDir(), '..', '..')

function firstExisting(candidates: (string | undefined)[]): string | undefined {
	return candidates.find((c): c is string => !!c && existsSync(c))
}

export function findNatsServer(): string {
	const onPath = (process.env.PATH ?? '').split(delimiter).map((d) => join(d, 'nats-server'))
	const bin = firstExisting([process.env.NATS_SERVER_BIN, join(repoDir, '.tools/nats/bin/nats-server'), ...onPath])
	if (!bin) throw new Error('nats-server not found: set NATS_SERVER_BIN or install it at .tools/nats/bin/nats-server')
	return bin
}

export function findServiceBinary(): string | undefined {
	return firstExisting([process.env.BSTORE_BIN, join(repoDir, 'target/ci/baileys-store'), join(repoDir, 'target/debug/baileys-store')])
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function waitFor<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
	const deadline = Date.now() + timeoutMs
	let last: unknown
	while (Date.now() < deadline) {
		try {
			const value = await probe()
			if (value !== undefined) return value
		} catch (err) {
			last = err
		}
		await sleep(50)
	}
	throw new Error(`${what} not ready after ${timeoutMs} ms${last ? `: ${String(last)}` : ''}`)
}

function exited(child: ChildProcess): Promise<void> {
	if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve()
	return new Promise((r) => child.once('exit', () => r()))
}

export class NatsServer {
	private constructor(
		readonly url: string,
		/** The monitoring endpoint (`/connz`, `/healthz`, ...). */
		readonly monitorUrl: string,
		private child: ChildProcess,
		private readonly dir: string
	) {}

	/** `config` is added to the server's config file (e.g. an `authorization` block). */
	static async start(config = ''): Promise<NatsServer> {
		const dir = mkdtempSync(join(tmpdir(), 'bstore-nats-'))
		// max_payload is not a command-line flag; Baileys' largest requests need more than the 1 MB default.
		writeFileSync(join(dir, 'nats.conf'), `max_payload: 8MB\n${config}\n`)
		const { child, ports } = await NatsServer.spawn(dir, '-1', '-1')
		return new NatsServer(ports.nats[0]!, ports.monitoring[0]!, child, dir)
	}

	private static async spawn(dir: string, port: string, monitorPort: string) {
		const child = spawn(
			findNatsServer(),
			['-c', join(dir, 'nats.conf'), '-js', '-a', '127.0.0.1', '-p', port, '-m', monitorPort, '-sd', join(dir, 'js'), '--ports_file_dir', dir],
			// Its log goes to a file: the test runner's output stays readable.
			{ stdio: ['ignore', 'ignore', openSync(join(dir, 'nats.log'), 'a')] }
		)
		const portsFile = join(dir, `nats-server_${child.pid}.ports`)
		const ports = await waitFor('nats-server ports file', 10_000, async () =>
			existsSync(portsFile) ? (JSON.parse(readFileSync(portsFile, 'utf8')) as { nats: string[]; monitoring: string[] }) : undefined
		)
		await waitFor('nats-server JetStream', 10_000, async () => {
			const res = await fetch(`${ports.monitoring[0]}/healthz?js-enabled-only=true`)
			return res.ok ? true : undefined
		})
		return { child, ports }
	}

	/** Stops the server and starts it again on the same ports, with the same config and store: clients reconnect. */
	async restart(): Promise<void> {
		this.child.kill('SIGTERM')
		await exited(this.child)
		this.child = (await NatsServer.spawn(this.dir, new URL(this.url).port, new URL(this.monitorUrl).port)).child
	}

	/** CPU seconds the nats-server process has used. */
	cpuSeconds(): number {
		return this.child.pid ? procCpuSeconds(this.child.pid) : 0
	}

	connect(): Promise<NatsConnection> {
		return connect({ servers: this.url, maxReconnectAttempts: -1 })
	}

	async stop(): Promise<void> {
		this.child.kill('SIGTERM')
		await exited(this.child)
		rmSync(this.dir, { recursive: true, force: true })
	}
}

/** The baileys-store service; restarts keep its data dir and sealing key. */
export class Service {
	private child?: ChildProcess
	readonly env: NodeJS.ProcessEnv

	constructor(
		readonly bin: string,
		readonly natsUrl: string,
		readonly dataDir = mkdtempSync(join(tmpdir(), 'bstore-data-'))
	) {
		this.env = {
			...process.env,
			BSTORE_NATS_URL: natsUrl,
			BSTORE_DATA_DIR: dataDir,
			BSTORE_KEYS: `1:${randomBytes(32).toString('base64')}`,
			BSTORE_LOG: process.env.BSTORE_LOG ?? 'warn'
		}
	}

	get pid(): number | undefined {
		return this.child?.pid
	}

	/** Starts the service and waits until it answers session.info. */
	async start(nc: NatsConnection): Promise<void> {
		this.child = spawn(this.bin, ['serve'], { env: this.env, stdio: ['ignore', 'inherit', 'inherit'] })
		const child = this.child
		const probe = new BaileysStoreClient(nc, { tenant: 'probe', session: 'ready', timeoutMs: 500, retries: 0 })
		await waitFor('baileys-store service', 30_000, async () => {
			if (child.exitCode !== null) throw new Error(`service exited with ${child.exitCode}`)
			await probe.info()
			return true
		})
	}

	/** SIGTERM, and wait for the process to end. */
	async stop(): Promise<void> {
		const child = this.child
		if (!child) return
		child.kill('SIGTERM')
		await exited(child)
		this.child = undefined
	}

	/** SIGKILL: no chance to flush anything. */
	async kill(): Promise<void> {
		const child = this.child
		if (!child) return
		child.kill('SIGKILL')
		await exited(child)
		this.child = undefined
	}

	/** CPU seconds the running service process has used. */
	cpuSeconds(): number {
		return this.child?.pid ? procCpuSeconds(this.child.pid) : 0
	}

	async dispose(): Promise<void> {
		await this.stop()
		rmSync(this.dataDir, { recursive: true, force: true })
	}
}

/** CPU seconds (user + system) a process has used, from /proc/<pid>/stat. */
export function procCpuSeconds(pid: number): number {
	const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
	// Fields after the command name, which is in parentheses and may hold spaces: utime and stime are 14 and 15.
	const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
	const ticksPerSecond = 100 // USER_HZ on Linux
	return (Number(fields[11]) + Number(fields[12])) / ticksPerSecond
}

/** A fresh temporary directory, e.g. for useMultiFileAuthState. */
export function tempDir(prefix: string): string {
	return mkdtempSync(join(tmpdir(), prefix))
}

export function removeDir(dir: string): void {
	rmSync(dir, { recursive: true, force: true })
}

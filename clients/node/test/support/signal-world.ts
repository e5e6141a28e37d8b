// Baileys' own Signal code, run offline: several accounts and devices exchange real
// 1:1 and group messages through whatever auth state store they are given. The
// pieces are wired as makeWASocket wires them; the WhatsApp server's part (keeping
// pre-key bundles, fanning stanzas out) is played by this file.
import { randomBytes } from 'node:crypto'
import {
	addTransactionCapability,
	type AuthenticationState,
	type BinaryNode,
	DEFAULT_CONNECTION_CONFIG,
	decryptMessageNode,
	encodeWAMessage,
	getBinaryNodeChild,
	getBinaryNodeChildren,
	getNextPreKeysNode,
	INITIAL_PREKEY_COUNT,
	isPnUser,
	makeCacheableSignalKeyStore,
	parseAndInjectE2ESessions,
	proto,
	type SignalKeyStoreWithTransaction,
	type SignalRepositoryWithLIDStore
} from '@whiskeysockets/baileys'

export interface AuthHandle {
	state: AuthenticationState
	saveCreds: () => Promise<void>
}

/** Opens (or reopens) the stored auth state of one device, e.g. `alice-1`. */
export type OpenAuth = (device: string) => Promise<AuthHandle>

export interface AccountSpec {
	name: string
	lidUser: string
	pnUser: string
	devices: number[]
}

/** Three accounts, one of them with two devices. */
export const ACCOUNTS: AccountSpec[] = [
	{ name: 'alice', lidUser: '100000000000001', pnUser: '15550001001', devices: [1, 2] },
	{ name: 'bob', lidUser: '100000000000002', pnUser: '15550001002', devices: [1] },
	{ name: 'carol', lidUser: '100000000000003', pnUser: '15550001003', devices: [3] }
]

export const GROUP = '120363000000000001@g.us'

/** Collects what Baileys logs at warn and error (a failed decrypt is logged, not thrown). */
export class RecordingLogger {
	level = 'warn'
	readonly problems: string[] = []
	child() {
		return this
	}
	trace() {}
	debug() {}
	info() {}
	warn(obj: unknown, msg?: string) {
		this.problems.push(`warn: ${msg ?? ''} ${describe(obj)}`)
	}
	error(obj: unknown, msg?: string) {
		this.problems.push(`error: ${msg ?? ''} ${describe(obj)}`)
	}
}

function describe(obj: unknown): string {
	if (typeof obj === 'string') return obj
	const err = (obj as { err?: unknown; error?: unknown })?.err ?? (obj as { error?: unknown })?.error
	return err instanceof Error ? err.message : ''
}

export class Device {
	readonly name: string
	readonly lid: string
	readonly pn: string
	auth!: AuthHandle
	keys!: SignalKeyStoreWithTransaction
	repo!: SignalRepositoryWithLIDStore
	/** Plaintexts this device decrypted, in order. */
	readonly received: string[] = []

	constructor(
		readonly account: AccountSpec,
		readonly deviceId: number
	) {
		this.name = `${account.name}-${deviceId}`
		this.lid = `${account.lidUser}:${deviceId}@lid`
		this.pn = `${account.pnUser}:${deviceId}@s.whatsapp.net`
	}

	/** Builds the key store stack and Signal repository as makeWASocket does; `cached` puts makeCacheableSignalKeyStore in front of the store. */
	async open(openAuth: OpenAuth, logger: RecordingLogger, cached = true): Promise<void> {
		this.auth = await openAuth(this.name)
		const { creds, keys } = this.auth.state
		const base = cached ? makeCacheableSignalKeyStore(keys, logger) : keys
		this.keys = addTransactionCapability(base, logger, DEFAULT_CONNECTION_CONFIG.transactionOpts)
		this.repo = DEFAULT_CONNECTION_CONFIG.makeSignalRepository({ creds, keys: this.keys }, logger)
	}
}

interface Bundle {
	registration: Uint8Array
	identity: Uint8Array
	signedPreKey: BinaryNode
	preKeys: BinaryNode[]
}

interface Delivery {
	to: Device
	stanza: BinaryNode
	expected: string
}

/**
 * The devices of some accounts and the server's part between them. Subclasses script the
 * rounds: `World` below for the tests, `BenchWorld` in bench/ for the benchmark.
 */
export class SignalWorld {
	readonly devices: Device[]
	readonly logger = new RecordingLogger()
	/** The server's pre-key bundles, by LID device jid. */
	private readonly bundles = new Map<string, Bundle>()
	readonly failures: string[] = []
	/** Messages sent, and messages decrypted by a recipient device. */
	sent = 0
	delivered = 0
	private seq = 0

	constructor(
		private readonly openAuth: OpenAuth,
		readonly accounts: AccountSpec[],
		readonly group: string
	) {
		this.devices = accounts.flatMap((a) => a.devices.map((d) => new Device(a, d)))
	}

	device(name: string): Device {
		const d = this.devices.find((x) => x.name === name)
		if (!d) throw new Error(`no device ${name}`)
		return d
	}

	/** Registers every device: creds, the first pre-key upload (812 in one transaction) and device lists. */
	async setup(cached = true): Promise<void> {
		for (const d of this.devices) {
			await d.open(this.openAuth, this.logger, cached)
			const { creds } = d.auth.state
			creds.me = { id: d.pn, lid: d.lid, name: d.account.name }
			creds.registered = true
			await this.uploadPreKeys(d)
			// What usync stores for the other accounts.
			const lists: Record<string, string[]> = {}
			for (const a of this.accounts) lists[a.lidUser] = a.devices.map(String)
			await d.keys.set({ 'device-list': lists })
		}
	}

	/** As the socket's uploadPreKeys: generate in a transaction, save creds, hand the bundle to the server. */
	private async uploadPreKeys(d: Device): Promise<void> {
		const { creds } = d.auth.state
		const node = await d.keys.transaction(async () => {
			const { update, node } = await getNextPreKeysNode({ creds, keys: d.keys }, INITIAL_PREKEY_COUNT)
			Object.assign(creds, update)
			return node
		}, creds.me!.id)
		await d.auth.saveCreds()
		const child = (tag: string) => getBinaryNodeChild(node, tag)!
		this.bundles.set(d.lid, {
			registration: child('registration').content as Uint8Array,
			identity: child('identity').content as Uint8Array,
			signedPreKey: child('skey'),
			preKeys: getBinaryNodeChildren(child('list'), 'key')
		})
	}

	/** Drops every in-process cache and reopens each device from its store, as a restarted bot would. */
	async reopen(cached = true): Promise<void> {
		for (const d of this.devices) await d.open(this.openAuth, this.logger, cached)
		// The LID mapping lives in the store; the repository's own cache starts empty.
	}

	/** What the socket's assertSessions does: fetch bundles for devices without a session and inject them. */
	private async assertSessions(from: Device, jids: string[]): Promise<void> {
		const users: BinaryNode[] = []
		for (const jid of jids) {
			if ((await from.repo.validateSession(jid)).exists) continue
			const wireJid = isPnUser(jid) ? ((await from.repo.lidMapping.getLIDForPN(jid)) ?? jid) : jid
			const bundle = this.bundles.get(wireJid)
			if (!bundle) throw new Error(`no pre-key bundle for ${wireJid}`)
			const preKey = bundle.preKeys.shift() // the server hands each pre-key out once
			users.push({
				tag: 'user',
				attrs: { jid: wireJid },
				content: [
					{ tag: 'registration', attrs: {}, content: bundle.registration },
					{ tag: 'identity', attrs: {}, content: bundle.identity },
					bundle.signedPreKey,
					...(preKey ? [preKey] : [])
				]
			})
		}
		if (users.length) await parseAndInjectE2ESessions({ tag: 'iq', attrs: {}, content: [{ tag: 'list', attrs: {}, content: users }] }, from.repo)
	}

	protected stanzaId(): string {
		return `3EB0${(++this.seq).toString(16).padStart(8, '0')}${randomBytes(4).toString('hex').toUpperCase()}`
	}

	/**
	 * A 1:1 message to every device of `to`, plus a copy to the sender's other devices.
	 * `viaPhoneNumber` addresses the recipient by PN, which Baileys maps to its LID session.
	 */
	async sendDirect(from: Device, to: AccountSpec, text: string, viaPhoneNumber = false): Promise<void> {
		const targets = this.devices.filter((d) => d.account === to || (d.account === from.account && d !== from))
		const chat = viaPhoneNumber ? `${to.pnUser}@s.whatsapp.net` : `${to.lidUser}@lid`
		const id = this.stanzaId()
		this.sent++
		const deliveries = await from.keys.transaction(async () => {
			// What relayMessage reads for every 1:1 send (messages-send.js): the contact's privacy token,
			// keyed by its LID. None is stored here, as for a contact that never sent one; Baileys' cache
			// keeps no absence, so each send asks the store.
			await from.keys.get('tctoken', [`${to.lidUser}@lid`])
			const jids = targets.map((d) => (viaPhoneNumber && d.account === to ? d.pn : d.lid))
			await this.assertSessions(from, jids)
			const out: Delivery[] = []
			for (const [i, d] of targets.entries()) {
				const own = d.account === from.account
				const message: proto.IMessage = own ? { deviceSentMessage: { destinationJid: chat, message: { conversation: text } } } : { conversation: text }
				const { type, ciphertext } = await from.repo.encryptMessage({ jid: jids[i]!, data: encodeWAMessage(message) })
				const attrs: Record<string, string> = { id, from: from.lid, t: String(Math.floor(Date.now() / 1000)), type: 'text' }
				if (own) attrs.recipient = `${to.lidUser}@lid`
				out.push({ to: d, expected: text, stanza: { tag: 'message', attrs, content: [{ tag: 'enc', attrs: { v: '2', type }, content: ciphertext }] } })
			}
			return out
		}, from.auth.state.creds.me!.id)
		await this.deliver(deliveries)
	}

	/** A group message as relayMessage sends it: sender key, plus the distribution message to devices that lack it. */
	async sendGroup(from: Device, text: string): Promise<void> {
		const group = this.group
		const members = this.devices.filter((d) => d !== from)
		const id = this.stanzaId()
		this.sent++
		const deliveries = await from.keys.transaction(async () => {
			const memory = (await from.keys.get('sender-key-memory', [group]))[group] ?? {}
			const { ciphertext, senderKeyDistributionMessage } = await from.repo.encryptGroupMessage({
				group,
				meId: from.lid,
				data: encodeWAMessage({ conversation: text })
			})
			const needKey = members.filter((d) => !memory[d.lid])
			const skdmNodes = new Map<Device, BinaryNode>()
			if (needKey.length) {
				await this.assertSessions(
					from,
					needKey.map((d) => d.lid)
				)
				for (const d of needKey) {
					const data = encodeWAMessage({ senderKeyDistributionMessage: { groupId: group, axolotlSenderKeyDistributionMessage: senderKeyDistributionMessage } })
					const { type, ciphertext: c } = await from.repo.encryptMessage({ jid: d.lid, data })
					skdmNodes.set(d, { tag: 'enc', attrs: { v: '2', type }, content: c })
					memory[d.lid] = true
				}
			}
			await from.keys.set({ 'sender-key-memory': { [group]: memory } })
			return members.map((d) => {
				const skdm = skdmNodes.get(d)
				const attrs = { id, from: group, participant: from.lid, t: String(Math.floor(Date.now() / 1000)), type: 'text' }
				const content: BinaryNode[] = [...(skdm ? [skdm] : []), { tag: 'enc', attrs: { v: '2', type: 'skmsg' }, content: ciphertext }]
				return { to: d, expected: text, stanza: { tag: 'message', attrs, content } }
			})
		}, from.auth.state.creds.me!.id)
		await this.deliver(deliveries)
	}

	/** Each recipient decrypts with Baileys' own decryptMessageNode, concurrently, as separate sockets would. */
	private async deliver(deliveries: Delivery[]): Promise<void> {
		await Promise.all(
			deliveries.map(async ({ to, stanza, expected }) => {
				const { fullMessage, decrypt } = decryptMessageNode(stanza, to.pn, to.lid, to.repo, this.logger)
				await decrypt()
				const text = fullMessage.message?.conversation
				if (fullMessage.messageStubType === proto.WebMessageInfo.StubType.CIPHERTEXT || text !== expected) {
					this.failures.push(`${to.name} got ${JSON.stringify(text)} (${fullMessage.messageStubParameters?.join(', ') ?? 'no error'}) for ${JSON.stringify(expected)}`)
				}
				if (text !== undefined && text !== null) to.received.push(text)
				this.delivered++
			})
		)
	}

	/** The group part of one round: every device sends once. */
	async groupRound(round: number): Promise<void> {
		for (const d of this.devices) await this.sendGroup(d, text(round, `${d.name} to the group`))
	}

	/** Plaintexts received, by device: the same script gives the same record on any store. */
	transcript(): Record<string, string[]> {
		return Object.fromEntries(this.devices.map((d) => [d.name, [...d.received]]))
	}
}

/** The tests' world: Alice (two devices), Bob and Carol; Carol knows Alice by phone number. */
export class World extends SignalWorld {
	constructor(openAuth: OpenAuth) {
		super(openAuth, ACCOUNTS, GROUP)
	}

	/** Registers every device, then gives Carol Alice's LID mapping; Baileys resolves her PN to it. */
	override async setup(): Promise<void> {
		await super.setup()
		const alice = ACCOUNTS[0]!
		await this.device('carol-3').repo.lidMapping.storeLIDPNMappings([{ lid: `${alice.lidUser}@lid`, pn: `${alice.pnUser}@s.whatsapp.net` }])
	}

	/** The 1:1 part of one round: every pair talks, Carol addresses Alice by phone number. */
	async directRound(round: number): Promise<void> {
		const send = (from: string, to: string, what: string, viaPhoneNumber = false) =>
			this.sendDirect(this.device(from), ACCOUNTS.find((a) => a.name === to)!, text(round, what), viaPhoneNumber)
		await send('alice-1', 'bob', 'alice-1 to bob')
		await send('bob-1', 'alice', 'bob-1 to alice')
		await send('carol-3', 'alice', 'carol-3 to alice by PN', true)
		await send('alice-2', 'carol', 'alice-2 to carol')
		await send('bob-1', 'carol', 'bob-1 to carol')
	}
}

/** Message texts of varied length, the same on every run. */
export function text(round: number, what: string): string {
	const filler = 'lorem ipsum dolor sit amet '.repeat((round * 7 + what.length) % 9)
	return `round ${round}: ${what}. ${filler}`.trim()
}

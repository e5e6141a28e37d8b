// Baileys' own Signal code, run offline, for the benchmark: any number of accounts and
// devices, with or without makeCacheableSignalKeyStore in front of the store. Wired as
// makeWASocket wires it (addTransactionCapability over the store, one transaction per
// send keyed by the sender's jid); the WhatsApp server's part (pre-key bundles, fan-out)
// is played here. Same protocol steps as test/support/signal-world.ts.
import { randomBytes } from 'node:crypto'
import {
	addTransactionCapability,
	type BinaryNode,
	DEFAULT_CONNECTION_CONFIG,
	decryptMessageNode,
	encodeWAMessage,
	getBinaryNodeChild,
	getBinaryNodeChildren,
	getNextPreKeysNode,
	INITIAL_PREKEY_COUNT,
	makeCacheableSignalKeyStore,
	parseAndInjectE2ESessions,
	proto,
	type SignalKeyStoreWithTransaction,
	type SignalRepositoryWithLIDStore
} from '@whiskeysockets/baileys'
import { type AccountSpec, type AuthHandle, type OpenAuth, RecordingLogger } from '../test/support/signal-world.js'

export class BenchDevice {
	readonly name: string
	readonly lid: string
	readonly pn: string
	auth!: AuthHandle
	keys!: SignalKeyStoreWithTransaction
	repo!: SignalRepositoryWithLIDStore

	constructor(
		readonly account: AccountSpec,
		readonly deviceId: number
	) {
		this.name = `${account.name}-${deviceId}`
		this.lid = `${account.lidUser}:${deviceId}@lid`
		this.pn = `${account.pnUser}:${deviceId}@s.whatsapp.net`
	}

	/** The key store stack and Signal repository as makeWASocket builds them; `cached` adds makeCacheableSignalKeyStore. */
	async open(openAuth: OpenAuth, logger: RecordingLogger, cached: boolean): Promise<void> {
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
	to: BenchDevice
	stanza: BinaryNode
	expected: string
}

/** `n` accounts of `devices` devices each; `tag` keeps the numbers of two worlds apart. */
export function accounts(tag: number, n: number, devices: number): AccountSpec[] {
	return Array.from({ length: n }, (_, i) => ({
		name: `w${tag}a${i}`,
		lidUser: `1${String(tag).padStart(4, '0')}${String(i).padStart(10, '0')}`,
		pnUser: `1555${String(tag).padStart(3, '0')}${String(i).padStart(4, '0')}`,
		devices: Array.from({ length: devices }, (_, d) => d + 1)
	}))
}

export class BenchWorld {
	readonly devices: BenchDevice[]
	readonly logger = new RecordingLogger()
	private readonly bundles = new Map<string, Bundle>()
	readonly failures: string[] = []
	/** Messages sent (one per send call), and device-level messages decrypted by recipients. */
	sent = 0
	delivered = 0
	private seq = 0
	readonly group: string

	constructor(
		private readonly openAuth: OpenAuth,
		readonly accounts: AccountSpec[],
		tag: number
	) {
		this.devices = accounts.flatMap((a) => a.devices.map((d) => new BenchDevice(a, d)))
		this.group = `1203630000${String(tag).padStart(8, '0')}@g.us`
	}

	/** Registers every device: creds, the first pre-key upload (812 in one transaction) and device lists. */
	async setup(cached: boolean): Promise<void> {
		const lists: Record<string, string[]> = {}
		for (const a of this.accounts) lists[a.lidUser] = a.devices.map(String)
		for (const d of this.devices) {
			await d.open(this.openAuth, this.logger, cached)
			const { creds } = d.auth.state
			creds.me = { id: d.pn, lid: d.lid, name: d.account.name }
			creds.registered = true
			await this.uploadPreKeys(d)
			await d.keys.set({ 'device-list': lists })
		}
	}

	/** Reopens every device from its store (the in-process cache, if any, starts empty). */
	async reopen(cached: boolean): Promise<void> {
		for (const d of this.devices) await d.open(this.openAuth, this.logger, cached)
	}

	private async uploadPreKeys(d: BenchDevice): Promise<void> {
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

	private async assertSessions(from: BenchDevice, jids: string[]): Promise<void> {
		const users: BinaryNode[] = []
		for (const jid of jids) {
			if ((await from.repo.validateSession(jid)).exists) continue
			const bundle = this.bundles.get(jid)
			if (!bundle) throw new Error(`no pre-key bundle for ${jid}`)
			const preKey = bundle.preKeys.shift()
			users.push({
				tag: 'user',
				attrs: { jid },
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

	private stanzaId(): string {
		return `3EB0${(++this.seq).toString(16).padStart(8, '0')}${randomBytes(4).toString('hex').toUpperCase()}`
	}

	/** A 1:1 message to every device of `to`, plus a copy to the sender's other devices. */
	async sendDirect(from: BenchDevice, to: AccountSpec, text: string): Promise<void> {
		const targets = this.devices.filter((d) => d.account === to || (d.account === from.account && d !== from))
		const chat = `${to.lidUser}@lid`
		const id = this.stanzaId()
		this.sent++
		const deliveries = await from.keys.transaction(async () => {
			await this.assertSessions(
				from,
				targets.map((d) => d.lid)
			)
			const out: Delivery[] = []
			for (const d of targets) {
				const own = d.account === from.account
				const message: proto.IMessage = own ? { deviceSentMessage: { destinationJid: chat, message: { conversation: text } } } : { conversation: text }
				const { type, ciphertext } = await from.repo.encryptMessage({ jid: d.lid, data: encodeWAMessage(message) })
				const attrs: Record<string, string> = { id, from: from.lid, t: String(Math.floor(Date.now() / 1000)), type: 'text' }
				if (own) attrs.recipient = chat
				out.push({ to: d, expected: text, stanza: { tag: 'message', attrs, content: [{ tag: 'enc', attrs: { v: '2', type }, content: ciphertext }] } })
			}
			return out
		}, from.auth.state.creds.me!.id)
		await this.deliver(deliveries)
	}

	/** A group message as relayMessage sends it: sender key, plus the distribution message to devices that lack it. */
	async sendGroup(from: BenchDevice, text: string): Promise<void> {
		const members = this.devices.filter((d) => d !== from)
		const group = this.group
		const id = this.stanzaId()
		this.sent++
		const deliveries = await from.keys.transaction(async () => {
			const memory = (await from.keys.get('sender-key-memory', [group]))[group] ?? {}
			const { ciphertext, senderKeyDistributionMessage } = await from.repo.encryptGroupMessage({ group, meId: from.lid, data: encodeWAMessage({ conversation: text }) })
			const needKey = members.filter((d) => !memory[d.lid])
			const skdmNodes = new Map<BenchDevice, BinaryNode>()
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

	/** Each recipient decrypts with Baileys' decryptMessageNode, concurrently, as separate sockets would. */
	private async deliver(deliveries: Delivery[]): Promise<void> {
		await Promise.all(
			deliveries.map(async ({ to, stanza, expected }) => {
				const { fullMessage, decrypt } = decryptMessageNode(stanza, to.pn, to.lid, to.repo, this.logger)
				await decrypt()
				const text = fullMessage.message?.conversation
				if (fullMessage.messageStubType === proto.WebMessageInfo.StubType.CIPHERTEXT || text !== expected) {
					this.failures.push(`${to.name} got ${JSON.stringify(text)} (${fullMessage.messageStubParameters?.join(', ') ?? 'no error'}) for ${JSON.stringify(expected)}`)
				}
				this.delivered++
			})
		)
	}

	/** Every device sends one 1:1 message to every other account (all of its devices, plus the sender's other devices). */
	async directRound(round: number): Promise<void> {
		for (const from of this.devices) {
			for (const to of this.accounts) {
				if (to === from.account) continue
				await this.sendDirect(from, to, text(round, `${from.name} to ${to.name}`))
			}
		}
	}

	/** Every device sends one group message. */
	async groupRound(round: number): Promise<void> {
		for (const d of this.devices) await this.sendGroup(d, text(round, `${d.name} to the group`))
	}
}

/** Message texts of varied length, the same on every run. */
function text(round: number, what: string): string {
	const filler = 'lorem ipsum dolor sit amet '.repeat((round * 7 + what.length) % 9)
	return `round ${round}: ${what}. ${filler}`.trim()
}

// The benchmark's Baileys world: any number of accounts and devices, with or without
// makeCacheableSignalKeyStore in front of the store. The protocol steps (pre-key upload,
// bundles, 1:1 and group sends as the socket makes them, decryption with Baileys'
// decryptMessageNode) are the tests' own, from test/support/signal-world.ts.
import { type AccountSpec, type OpenAuth, SignalWorld, text } from '../test/support/signal-world.js'

/** `n` accounts of `devices` devices each; `tag` keeps the numbers of two worlds apart. */
export function accounts(tag: number, n: number, devices: number): AccountSpec[] {
	return Array.from({ length: n }, (_, i) => ({
		name: `w${tag}a${i}`,
		lidUser: `1${String(tag).padStart(4, '0')}${String(i).padStart(10, '0')}`,
		pnUser: `1555${String(tag).padStart(3, '0')}${String(i).padStart(4, '0')}`,
		devices: Array.from({ length: devices }, (_, d) => d + 1)
	}))
}

export class BenchWorld extends SignalWorld {
	constructor(openAuth: OpenAuth, accounts: AccountSpec[], tag: number) {
		super(openAuth, accounts, `1203630000${String(tag).padStart(8, '0')}@g.us`)
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
}

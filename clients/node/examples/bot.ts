// A minimal Baileys bot whose auth state lives in baileys-store.
//
//   NATS_URL="$(cat ../../data/bot.url)" BSTORE_TENANT=acme BSTORE_SESSION=bot-1 npm run example
//
// NATS_URL may carry the bot's user and password (the embedded default writes such a URL into
// data/bot.url).
//
// Scan the QR code it prints with WhatsApp (Linked devices). It answers "ping" with "pong".
// In an application, import from '@baileys-store/client' instead of '../src/index.js'.
import makeWASocket, { DisconnectReason, makeCacheableSignalKeyStore } from '@whiskeysockets/baileys'
import { connect } from 'nats'
import pino from 'pino'
import qrcode from 'qrcode-terminal'
import { useNatsAuthState } from '../src/index.js'

const logger = pino({ level: process.env.LOG_LEVEL ?? 'warn' })
const url = new URL(process.env.NATS_URL ?? 'nats://127.0.0.1:4222')
const nc = await connect({
	servers: `${url.hostname}:${url.port || 4222}`,
	user: url.username ? decodeURIComponent(url.username) : undefined,
	pass: url.password ? decodeURIComponent(url.password) : undefined,
	name: 'baileys-bot',
	maxReconnectAttempts: -1
})

// The one line that differs from a file-based bot: `await useMultiFileAuthState('auth_info')` becomes
const { state, saveCreds, clear } = await useNatsAuthState(nc, {
	tenant: process.env.BSTORE_TENANT ?? 'demo',
	session: process.env.BSTORE_SESSION ?? 'bot-1',
	logger
})

let stopping = false
let sock: ReturnType<typeof makeWASocket> | undefined

function start(): void {
	sock = makeWASocket({
		auth: { creds: state.creds, keys: makeCacheableSignalKeyStore(state.keys, logger) },
		logger
	})
	const current = sock
	sock.ev.on('creds.update', saveCreds)

	sock.ev.on('connection.update', async ({ connection, lastDisconnect, qr }) => {
		if (qr) {
			console.log('Scan this QR code with WhatsApp > Linked devices:')
			qrcode.generate(qr, { small: true })
		}
		if (connection === 'open') console.log(`connected as ${state.creds.me?.id}`)
		if (connection === 'close' && !stopping) {
			const status = (lastDisconnect?.error as { output?: { statusCode?: number } } | undefined)?.output?.statusCode
			if (status === DisconnectReason.loggedOut) {
				console.log('logged out: deleting the stored session')
				await clear()
				await nc.close()
				return
			}
			console.log(`connection closed (${lastDisconnect?.error?.message ?? 'no reason'}), reconnecting in 5 s`)
			setTimeout(start, 5000)
		}
	})

	sock.ev.on('messages.upsert', async ({ messages, type }) => {
		if (type !== 'notify') return
		for (const m of messages) {
			const text = m.message?.conversation ?? m.message?.extendedTextMessage?.text
			if (!m.key.fromMe && m.key.remoteJid && text?.trim().toLowerCase() === 'ping') {
				await current.sendMessage(m.key.remoteJid, { text: 'pong' }, { quoted: m })
			}
		}
	})
}

process.once('SIGINT', async () => {
	stopping = true
	sock?.end(undefined)
	await nc.drain()
	process.exit(0)
})

start()

import { World } from '../helpers/signal-world.js'
import { memoryStore, fileStore } from '../helpers/stores.js'
import { tempDir } from '../helpers/servers.js'
for (const [name, open] of [['memory', memoryStore()], ['file', fileStore(tempDir('bfile-'))]] as const) {
	const w = new World(open)
	let t = Date.now()
	await w.setup()
	console.log(name, 'setup ms', Date.now() - t)
	t = Date.now()
	for (let r = 0; r < 5; r++) { await w.directRound(r); await w.groupRound(r) }
	await w.reopen()
	for (let r = 5; r < 8; r++) { await w.directRound(r); await w.groupRound(r) }
	console.log(name, 'rounds ms', Date.now() - t, 'delivered', w.delivered, 'failures', w.failures.length, w.failures.slice(0, 3), w.logger.problems.slice(0, 5))
}

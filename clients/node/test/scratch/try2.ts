import { World } from '../helpers/signal-world.js'
import { memoryStore } from '../helpers/stores.js'
const base = memoryStore()
let lose = false
const w = new World(async (d) => {
	const h = await base(d)
	const set = h.state.keys.set.bind(h.state.keys)
	h.state.keys.set = async (data) => { if (lose && d === 'bob-1' && data['session']) { const { session, ...rest } = data; return set(rest) } return set(data) }
	return h
})
await w.setup()
await w.directRound(0); await w.groupRound(0)
lose = true
await w.directRound(1); await w.groupRound(1)
await w.reopen()
try { await w.directRound(2); await w.groupRound(2) } catch (e) { console.log('threw', (e as Error).message) }
console.log('failures', w.failures.length, w.failures.slice(0, 2), w.logger.problems.length)

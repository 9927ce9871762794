// The control API from Node, as an app uses it. Prints one JSON object:
// connect → first start (no daemon running), list() of 100 processes,
// owner SIGKILLed → its last service gone. argv: spindle binary, scratch dir.
const path = require('path');
const fs = require('fs');
const { spawn } = require('child_process');
const { connect } = require('../../../clients/node/index.js');
const [bin, scratch] = process.argv.slice(2);

const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const ms = (t0) => Number(process.hrtime.bigint() - t0) / 1e6;
const alive = (pid) => { try { process.kill(pid, 0); return true; } catch (e) { return e.code === 'EPERM'; } };

async function firstStart(i) {
  const home = path.join(scratch, `first-${i}`);
  const t0 = process.hrtime.bigint();
  const pm = await connect({ home, bin });
  await pm.start({ name: 'one', command: 'sleep', args: ['1000'] });
  const took = ms(t0);
  await pm.shutdown();
  return took;
}

async function list100() {
  const pm = await connect({ home: path.join(scratch, 'list'), bin });
  const entries = Array.from({ length: 100 }, (_, i) => ({ name: `p${i}`, command: 'sleep', args: ['1000'] }));
  await pm.start(entries);
  for (let i = 0; i < 4000; i++) {
    const ps = await pm.list();
    if (ps.every((p) => p.state === 'running')) break;
    await new Promise((r) => setTimeout(r, 5));
  }
  const times = [];
  for (let i = 0; i < 200; i++) {
    const t0 = process.hrtime.bigint();
    await pm.list();
    times.push(ms(t0));
  }
  await pm.shutdown();
  return median(times);
}

// An owner that starts three services (grace 200 ms) and is SIGKILLed.
async function ownerGone() {
  const home = path.join(scratch, 'owned');
  const owner = spawn(process.execPath, ['-e', `
    const { connect } = require(${JSON.stringify(path.join(__dirname, '../../../clients/node/index.js'))});
    (async () => {
      const pm = await connect({ owned: true, home: ${JSON.stringify(home)}, bin: ${JSON.stringify(bin)} });
      await pm.start([0, 1, 2].map((i) => ({ name: 's' + i, command: 'sleep', args: ['1000'], grace: '200ms' })));
      for (;;) {
        const ps = await pm.list();
        if (ps.length === 3 && ps.every((p) => p.pid)) { console.log(JSON.stringify(ps.map((p) => p.pid))); break; }
        await new Promise((r) => setTimeout(r, 5));
      }
      setInterval(() => {}, 1 << 30);
    })();`], { stdio: ['ignore', 'pipe', 'inherit'] });
  const pids = await new Promise((resolve) => {
    let buf = '';
    owner.stdout.on('data', (c) => { buf += c; if (buf.includes('\n')) resolve(JSON.parse(buf)); });
  });
  const t0 = process.hrtime.bigint();
  owner.kill('SIGKILL');
  for (let i = 0; i < 100000 && pids.some(alive); i++) await new Promise((r) => setImmediate(r));
  return ms(t0);
}

(async () => {
  fs.mkdirSync(scratch, { recursive: true });
  const firsts = [];
  for (let i = 0; i < 5; i++) firsts.push(await firstStart(i));
  const out = { first_start_ms: median(firsts), list_100_ms: await list100(), owner_gone_ms: await ownerGone() };
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(2); });

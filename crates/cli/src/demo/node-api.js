// `spindle demo`'s Node part: the control API against the demo's node.
const { connect } = require('spindle');

// A hung step ends the script, so the demo never waits on it for long.
setTimeout(() => {
  console.error('the Node part took longer than 10 s');
  process.exit(1);
}, 10_000).unref();

const show = (code, value) => console.log(`> ${code}\n${value}`);

(async () => {
  const pm = await connect({ home: process.env.SPINDLE_HOME });
  show('const pm = await connect({ home })', `connected to ${pm.home}`);

  const procs = await pm.list();
  show(
    "(await pm.list()).map(p => `${p.name} ${p.state}`)",
    procs.map((p) => `${p.name} ${p.state}`).join(', '),
  );

  const reply = await pm.send('local@counter:demo:spindle', { add: 1 }, { timeout: 5000 });
  show("(await pm.send('local@counter:demo:spindle', { add: 1 })).body", JSON.stringify(reply.body));

  const events = [];
  let restarting;
  const scheduled = new Promise((resolve) => (restarting = resolve));
  let stopped;
  const down = new Promise((resolve) => (stopped = resolve));
  pm.on('event', (e) => {
    // Its events may come before `start` resolves (which waits for the disk).
    if (e.name !== 'from-node') return;
    const why = e.reason ? ` (${e.reason}${e.code !== undefined ? ` ${e.code}` : ''})` : '';
    const delay = e.delay !== undefined ? ` in ${e.delay} ms` : '';
    events.push(`${e.event}${why}${delay}`);
    if (e.event === 'restarting') restarting();
    if (e.event === 'stopped') stopped();
  });
  await pm.subscribe();
  const ids = await pm.start({
    name: 'from-node',
    command: 'sh',
    args: ['-c', 'echo started from Node; sleep 0.2; exit 1'],
    restartAt: [100, '1s'],
  });
  show(
    "await pm.start({ name: 'from-node', command: 'sh', args: [...], restartAt: [100, '1s'] })",
    JSON.stringify(ids),
  );
  await scheduled;
  await pm.stop('from-node');
  await down;
  show("pm.on('event', e => ...)  // then pm.stop('from-node')", events.join(' → '));
  await pm.close();
})().catch((e) => {
  console.error(e.message);
  process.exit(1);
});

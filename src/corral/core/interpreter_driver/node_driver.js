// Corral's JavaScript context: one persistent Node process, driven by driver.py (see its docstring).
// Cells arrive as JSON lines on stdin ({"code": ...}); each runs with vm.runInThisContext, so top-level
// declarations persist from cell to cell. console output goes to the real stdout/stderr (the cell's streams);
// when a cell is done (a returned promise settled too) one JSON line goes to the fd in CORRAL_CTL_FD:
// {"result": util.inspect(value) | null, "error": {name, value, traceback} | null}.
// SIGINT interrupts a running cell (breakOnSigint), or abandons the promise it is waiting for.
'use strict';
const fs = require('fs');
const readline = require('readline');
const util = require('util');
const vm = require('vm');

const ctlFd = Number(process.env.CORRAL_CTL_FD);
delete process.env.CORRAL_CTL_FD;
globalThis.require = require;
globalThis.module = module;
globalThis.exports = exports;

let pendingReject = null;
process.on('SIGINT', () => {
  if (pendingReject) pendingReject(Object.assign(new Error('Script execution interrupted.'), { name: 'KeyboardInterrupt' }));
});
process.on('uncaughtException', (err) => { process.stderr.write(`Uncaught ${err && err.stack || err}\n`); });
process.on('unhandledRejection', (err) => { process.stderr.write(`Unhandled rejection: ${err && err.stack || err}\n`); });

function describe(err) {
  if (err instanceof Error || (err && typeof err === 'object' && 'message' in err)) {
    return { name: String(err.name || 'Error'), value: String(err.message), traceback: String(err.stack || '') };
  }
  return { name: 'Error', value: util.inspect(err), traceback: '' };
}

function done(payload) {
  fs.writeSync(ctlFd, JSON.stringify(payload) + '\n');
}

async function run(code, env) {
  const saved = {};
  for (const [k, v] of Object.entries(env)) {  // the cell's own environment variables, put back after it
    saved[k] = Object.prototype.hasOwnProperty.call(process.env, k) ? process.env[k] : undefined;
    process.env[k] = v;
  }
  try {
    await runCell(code);
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

async function runCell(code) {
  let value;
  try {
    value = vm.runInThisContext(code, { filename: 'cell.js', breakOnSigint: true, displayErrors: false });
    if (value && typeof value.then === 'function') {
      value = await new Promise((resolve, reject) => {
        pendingReject = reject;
        value.then(resolve, reject);
      });
    }
  } catch (err) {
    const error = describe(err);
    if (/interrupted/.test(error.value)) error.name = 'KeyboardInterrupt';
    return done({ result: null, error });
  } finally {
    pendingReject = null;
  }
  done({ result: value === undefined ? null : util.inspect(value), error: null });
}

const rl = readline.createInterface({ input: process.stdin, terminal: false });
const cells = [];
let busy = false;
async function next() {
  if (busy) return;
  busy = true;
  while (cells.length) {
    const cell = cells.shift();
    await run(cell.code, cell.env);
  }
  busy = false;
}
rl.on('line', (line) => {
  let msg;
  try { msg = JSON.parse(line); } catch (e) { return; }
  const env = msg.env && typeof msg.env === 'object' ? msg.env : {};
  cells.push({ code: String(msg.code), env });
  next();
});
rl.on('close', () => process.exit(0));

'use strict';
// Gets a token from token-broker, calls a protected API with it, and on a 401
// reports the token to the broker (InvalidateToken) and retries once with the
// new one; exits 1 unless the API then answers 2xx. With --watch, then keeps
// the current token through WatchToken and prints each rotation until the time
// is up or Ctrl-C.
//
// --demo-api calls a small protected API that this script serves itself on
// 127.0.0.1 (a free port), which refuses the first token it sees (401) and
// accepts any other, so that the 401 path can be tried without a real API.
//
// Prints versions, statuses and times; never a token value. --json prints one
// JSON object per line instead of text.
//
//   node example.js --target 127.0.0.1:50051 --collection demo --demo-api --watch 60
//   node example.js --target 127.0.0.1:50051 --collection overdrive-main \
//       --api-url https://api.example.com/v1/me

const http = require('node:http');
const https = require('node:https');

const { BrokerClient, codeName } = require('./token_broker_client');

const USAGE = `usage: node example.js [--target HOST:PORT|unix:/path.sock] [--collection NAME]
                       [--api-url URL | --demo-api] [--timeout SECONDS]
                       [--watch SECONDS] [--json]`;

let JSON_OUTPUT = false;

// One line of output: text, or a JSON object with --json. Never pass a token
// value here.
function emit(event, fields) {
  if (JSON_OUTPUT) {
    process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
  } else {
    const rest = Object.entries(fields)
      .map(([k, v]) => `${k}=${v instanceof Date ? v.toISOString() : v}`)
      .join(' ');
    process.stdout.write(`${event.padEnd(12)} ${rest}\n`);
  }
}

function parseArgs(argv) {
  const args = { target: '127.0.0.1:50051', collection: 'demo', apiUrl: null, demoApi: false,
    timeout: 5.0, watch: 0, json: false };
  const value = (i, name) => {
    if (i >= argv.length) throw new Error(`${name} needs a value`);
    return argv[i];
  };
  const seconds = (v, name) => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new Error(`${name}: not a number of seconds: ${v}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    switch (a) {
      case '--target': args.target = value(++i, a); break;
      case '--collection': args.collection = value(++i, a); break;
      case '--api-url': args.apiUrl = value(++i, a); break;
      case '--demo-api': args.demoApi = true; break;
      case '--timeout': args.timeout = seconds(value(++i, a), a); break;
      case '--watch': args.watch = seconds(value(++i, a), a); break;
      case '--json': args.json = true; break;
      case '-h': case '--help': process.stdout.write(USAGE + '\n'); process.exit(0); break;
      default: throw new Error(`unknown argument: ${a}`);
    }
  }
  if (args.apiUrl && args.demoApi) throw new Error('--api-url and --demo-api exclude each other');
  return args;
}

// host:port/path of url, without query string or user info (for reasons).
function safeUrl(url) {
  const u = new URL(url);
  return `${u.hostname}${u.port ? ':' + u.port : ''}${u.pathname}`;
}

// GET url with the token as a bearer; resolves to the HTTP status. Node's
// http client uses no proxy, so a loopback API is always called directly.
function callApi(url, token, timeout) {
  const mod = new URL(url).protocol === 'https:' ? https : http;
  return new Promise((resolve, reject) => {
    const req = mod.get(url, { headers: { Authorization: `Bearer ${token.value}` } }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
      res.on('error', reject);
    });
    req.setTimeout(timeout * 1000, () => req.destroy(new Error('timed out')));
    req.on('error', reject);
  });
}

// Calls the API; on 401 invalidates the refused version and retries once with
// the broker's replacement. Resolves to the final status.
async function callWithRetry(client, collection, url, token, timeout) {
  let status = await callApi(url, token, timeout);
  emit('api', { status, version: token.version });
  if (status !== 401) return status;
  const { token: next, refreshed } = await client.invalidate(
    collection, token.version, `401 from ${safeUrl(url)}`, timeout);
  emit('invalidated', { rejected_version: token.version, version: next.version, refreshed });
  status = await callApi(url, next, timeout);
  emit('api', { status, version: next.version });
  return status;
}

// A protected API on 127.0.0.1 (a free port) for --demo-api: GET /protected
// answers 401 to the first bearer token it ever sees and 200 to any other, as
// an upstream does that has rotated the token the broker still holds.
function startDemoApi() {
  let first = null;
  const server = http.createServer((req, res) => {
    const auth = req.headers.authorization || '';
    const bearer = auth.startsWith('Bearer ') ? auth.slice('Bearer '.length) : '';
    if (first === null) first = bearer;
    res.writeHead(bearer !== '' && bearer !== first ? 200 : 401, { 'Content-Length': 0 });
    res.end();
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () =>
      resolve({
        url: `http://127.0.0.1:${server.address().port}/protected`,
        close: () => server.close(),
      }));
  });
}

function grpcError(call, e) {
  if (e && e.code !== undefined && e.details !== undefined) {
    emit('error', { call, code: codeName(e.code), message: e.details });
    return 1;
  }
  throw e;
}

async function run(args, stopped) {
  const client = new BrokerClient(args.target);
  try {
    let token;
    try {
      token = await client.getToken(args.collection, args.timeout);
    } catch (e) {
      return grpcError('GetCollectionToken', e);
    }
    emit('token', { version: token.version, expires_at: token.expires_at, stale: token.stale });

    if (args.apiUrl) {
      let status;
      try {
        status = await callWithRetry(client, args.collection, args.apiUrl, token, args.timeout);
      } catch (e) {
        if (e && e.code !== undefined && e.details !== undefined) return grpcError('InvalidateToken', e);
        emit('error', { call: 'api', url: safeUrl(args.apiUrl), message: e.message });
        return 1;
      }
      if (!(status >= 200 && status < 300)) return 1;
    }

    if (args.watch > 0) {
      const watcher = client.watch(args.collection, {
        onToken: (t) => emit('watch', { version: t.version, expires_at: t.expires_at, stale: t.stale }),
        onError: (code, after, retryIn) =>
          emit('watch_error', { code, after_version: after, retry_in: retryIn }),
      });
      let timer;
      await Promise.race([
        new Promise((resolve) => { timer = setTimeout(resolve, args.watch * 1000); }),
        stopped,
        watcher.done,
      ]);
      clearTimeout(timer);
      await watcher.stop();
      const last = watcher.current();
      emit('stopped', { version: last ? last.version : null, reconnects: watcher.reconnects });
      if (watcher.error !== null) return 1;
    }
    return 0;
  } finally {
    client.close();
  }
}

async function main(argv) {
  let args;
  try {
    args = parseArgs(argv);
  } catch (e) {
    process.stderr.write(`${USAGE}\nexample.js: ${e.message}\n`);
    return 2;
  }
  JSON_OUTPUT = args.json;
  const stopped = new Promise((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  const demo = args.demoApi ? await startDemoApi() : null;
  if (demo) args.apiUrl = demo.url;
  try {
    return await run(args, stopped);
  } finally {
    if (demo) demo.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e) => {
    process.stderr.write(`example.js: ${e && e.stack ? e.stack : e}\n`);
    process.exit(1);
  },
);

'use strict';
// A small client for token-broker on @grpc/grpc-js, with the service loaded
// from this repository's proto at run time by @grpc/proto-loader.
//
// - BrokerClient#getToken: GetCollectionToken with a deadline.
// - BrokerClient#invalidate: InvalidateToken(collection, version), the
//   compare-and-invalidate call to make when the upstream answers 401: pass the
//   version of the token that was refused; only if it is still current does the
//   broker refresh, so many callers reporting the same token cause one refresh.
// - TokenWatcher: keeps the current token through WatchToken, reconnecting with
//   backoff after stream errors and resuming with after_version = the last
//   version seen, so no rotation is missed.
//
// Token values are secrets: nothing here logs or prints them, and a Token's
// value is a non-enumerable property, left out of JSON.stringify and
// console.log.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = 'token_broker/v1/token_broker.proto';

// The proto/ directory: TOKEN_BROKER_PROTO_DIR, else this repository's.
function protoDir() {
  return process.env.TOKEN_BROKER_PROTO_DIR || path.resolve(__dirname, '..', '..', '..', 'proto');
}

function loadService() {
  // protobufjs brings google/protobuf/{timestamp,duration}.proto itself.
  const definition = protoLoader.loadSync(PROTO, {
    includeDirs: [protoDir()],
    keepCase: true, // field names as in the proto: after_version, expires_at
    longs: String, // uint64 versions arrive as decimal strings
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).token_broker.v1.TokenBroker;
}

// Reconnect quickly when the broker restarts, and notice a dead peer on a
// quiet watch stream.
const CHANNEL_OPTIONS = {
  'grpc.initial_reconnect_backoff_ms': 250,
  'grpc.min_reconnect_backoff_ms': 250,
  'grpc.max_reconnect_backoff_ms': 5000,
  'grpc.keepalive_time_ms': 30000,
  'grpc.keepalive_timeout_ms': 10000,
};

// Codes after which retrying the same watch cannot help.
const PERMANENT = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.NOT_FOUND,
  grpc.status.UNIMPLEMENTED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.UNAUTHENTICATED,
]);

// The name of a gRPC status code, e.g. "UNAVAILABLE".
function codeName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
}

function toDate(ts) {
  return new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6));
}

class Token {
  constructor(t) {
    this.collection = t.collection;
    // A secret: not enumerable, so never in JSON.stringify, console.log or output.
    Object.defineProperty(this, 'value', { value: t.value, enumerable: false });
    this.version = Number(t.version);
    this.expires_at = toDate(t.expires_at);
    this.refresh_at = toDate(t.refresh_at);
    this.stale = Boolean(t.stale);
  }
}

// One channel to a broker. target: "127.0.0.1:50051" or "unix:/path.sock".
class BrokerClient {
  constructor(target, options = CHANNEL_OPTIONS) {
    this.target = target;
    const opts = { ...options };
    if (target.startsWith('unix:') && !('grpc.default_authority' in opts)) {
      // A socket path is not a valid HTTP/2 :authority; the broker refuses it.
      opts['grpc.default_authority'] = 'localhost';
    }
    const TokenBroker = loadService();
    this.stub = new TokenBroker(target, grpc.credentials.createInsecure(), opts);
  }

  close() {
    this.stub.close();
  }

  // The collection's current token; rejects with a grpc error (code,
  // details), e.g. DEADLINE_EXCEEDED after `timeout` seconds.
  getToken(collection, timeout = 5.0) {
    return new Promise((resolve, reject) => {
      this.stub.GetCollectionToken(
        { collection },
        { deadline: Date.now() + timeout * 1000 },
        (err, resp) => (err ? reject(err) : resolve(new Token(resp.token))),
      );
    });
  }

  // Reports that the upstream refused `version`. Resolves to { token,
  // refreshed }: the current token after the call, and whether this report
  // forced its refresh (false when the version was no longer current).
  invalidate(collection, version, reason = '', timeout = 10.0) {
    return new Promise((resolve, reject) => {
      this.stub.InvalidateToken(
        { collection, version: String(version), reason },
        { deadline: Date.now() + timeout * 1000 },
        (err, resp) =>
          err ? reject(err) : resolve({ token: new Token(resp.token), refreshed: resp.refreshed }),
      );
    });
  }

  // A started TokenWatcher on this channel.
  watch(collection, options = {}) {
    return new TokenWatcher(this, collection, options).start();
  }
}

// Keeps the collection's current token up to date from WatchToken.
//
// After an error, or the server ending the stream (e.g. "UNAVAILABLE: server
// is shutting down"), it waits a jittered, doubling delay (initialBackoff up to
// maxBackoff seconds; reset once a token arrives) and reconnects with
// after_version set to the last version it saw, so it receives every rotation
// since. A broker with the in-memory store restarts its versions at 1; it
// answers such a watcher with its current token, taken as current even though
// its version is lower.
//
// onToken(token) and onError(codeName, afterVersion, retryIn) are called on
// each token and each stream end; `done` resolves once the watcher has stopped
// (stop(), or an error retrying cannot fix, then kept in `error`).
class TokenWatcher {
  constructor(client, collection, { onToken, onError, initialBackoff = 0.25, maxBackoff = 10.0 } = {}) {
    this.client = client;
    this.collection = collection;
    this.onToken = onToken;
    this.onError = onError;
    this.initialBackoff = initialBackoff;
    this.maxBackoff = maxBackoff;
    this.reconnects = 0;
    this.error = null; // the permanent error's code name, if one ended the watch
    this.token = null;
    this._after = 0;
    this._delay = initialBackoff;
    this._call = null;
    this._timer = null;
    this._stopping = false;
    this.done = new Promise((resolve) => {
      this._resolve = resolve;
    });
  }

  start() {
    this._connect();
    return this;
  }

  // The latest token seen, or null before the first one.
  current() {
    return this.token;
  }

  stop() {
    this._stopping = true;
    clearTimeout(this._timer);
    if (this._call) {
      this._call.cancel();
    } else {
      this._resolve();
    }
    return this.done;
  }

  _connect() {
    if (this._stopping) {
      this._resolve();
      return;
    }
    const call = this.client.stub.WatchToken({
      collection: this.collection,
      after_version: String(this._after),
    });
    this._call = call;
    call.on('data', (resp) => {
      const token = new Token(resp.token);
      this._after = token.version;
      this._delay = this.initialBackoff;
      this.token = token;
      if (this.onToken) this.onToken(token);
    });
    call.on('error', () => {}); // the code arrives with 'status'
    call.on('status', (status) => this._ended(status.code));
  }

  _ended(code) {
    this._call = null;
    if (this._stopping) {
      this._resolve();
      return;
    }
    if (PERMANENT.has(code)) {
      this.error = codeName(code);
      if (this.onError) this.onError(this.error, this._after, null);
      this._resolve();
      return;
    }
    const retryIn = this._delay / 2 + (Math.random() * this._delay) / 2;
    if (this.onError) this.onError(codeName(code), this._after, retryIn);
    this._delay = Math.min(this._delay * 2, this.maxBackoff);
    this._timer = setTimeout(() => {
      this.reconnects += 1;
      this._connect();
    }, retryIn * 1000);
  }
}

module.exports = { BrokerClient, TokenWatcher, Token, codeName, PERMANENT };

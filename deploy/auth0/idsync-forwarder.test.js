// Tests of the Event Stream Action, run by Node's own runner: node --test deploy/auth0/
// `fetch` is replaced by a stub that records each call and answers as told.

"use strict";

const assert = require("node:assert/strict");
const { afterEach, describe, it } = require("node:test");

const { onExecuteEventStream, DEFAULT_TIMEOUT_MS } = require("./idsync-forwarder.js");

const URL = "https://idsync.example.com/events/auth0";
const TOKEN = "ingest-secret-0123456789";
const realFetch = globalThis.fetch;

function cloudEvent() {
  return {
    id: "evt_01JDPQ2Z8W7RHS3XK4M5N6P7Q8",
    source: "urn:auth0:acme.us.auth0.com",
    specversion: "1.0",
    type: "user.updated",
    time: "2026-12-02T09:00:00.000Z",
    data: { object: { user_id: "auth0|123", email: "ann@example.com" } },
  };
}

function event(secrets = {}) {
  return {
    message: cloudEvent(),
    secrets: { IDSYNC_WEBHOOK_URL: URL, IDSYNC_INGEST_TOKEN: TOKEN, ...secrets },
  };
}

/** Replace fetch with `answer(url, init)`; return the list of calls it records. */
function stubFetch(answer) {
  const calls = [];
  globalThis.fetch = async (url, init) => {
    calls.push({ url, init });
    return answer(url, init);
  };
  return calls;
}

function reply(status, body = {}) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "Content-Type": "application/json" },
  });
}

afterEach(() => {
  globalThis.fetch = realFetch;
});

describe("idsync forwarder", () => {
  it("posts the CloudEvent to idsync with the Bearer token", async () => {
    const calls = stubFetch(() => reply(202, { status: "accepted" }));
    await onExecuteEventStream(event(), {});
    assert.equal(calls.length, 1);
    const { url, init } = calls[0];
    assert.equal(url, URL);
    assert.equal(init.method, "POST");
    assert.equal(init.headers.Authorization, `Bearer ${TOKEN}`);
    assert.equal(init.headers["Content-Type"], "application/cloudevents+json");
    assert.deepEqual(JSON.parse(init.body), cloudEvent());
    assert.ok(init.signal instanceof AbortSignal, "every post has a timeout signal");
  });

  for (const [status, label] of [
    [200, "duplicate"],
    [202, "ignored"],
    [204, null],
  ]) {
    it(`treats ${status} as delivered`, async () => {
      stubFetch(() =>
        status === 204 ? new Response(null, { status }) : reply(status, { status: label })
      );
      await onExecuteEventStream(event(), {});
    });
  }

  for (const status of [301, 400, 401, 403, 413, 422, 429, 500, 503]) {
    it(`throws on ${status}, naming the status and not the token`, async () => {
      stubFetch(() => reply(status, { status: "rejected", error: "no" }));
      await assert.rejects(onExecuteEventStream(event(), {}), (error) => {
        assert.match(error.message, new RegExp(`answered ${status}`));
        assert.match(error.message, /evt_01JDPQ2Z8W7RHS3XK4M5N6P7Q8/);
        assert.ok(!error.message.includes(TOKEN));
        return true;
      });
    });
  }

  it("throws when idsync cannot be reached", async () => {
    stubFetch(() => {
      throw new TypeError("fetch failed");
    });
    await assert.rejects(onExecuteEventStream(event(), {}), /not delivered: TypeError: fetch failed/);
  });

  it("gives up after the timeout and throws", async () => {
    // A server that never answers: the stub waits for the abort signal, as fetch does.
    // AbortSignal.timeout's timer does not keep Node alive (a real fetch's socket
    // would), so a longer timer stands in for the socket until the abort.
    stubFetch(
      (_url, init) =>
        new Promise((_resolve, reject) => {
          const socket = setTimeout(() => reject(new Error("the timeout never fired")), 5000);
          init.signal.addEventListener("abort", () => {
            clearTimeout(socket);
            reject(init.signal.reason);
          });
        })
    );
    const started = Date.now();
    await assert.rejects(
      onExecuteEventStream(event({ IDSYNC_TIMEOUT_MS: "50" }), {}),
      /no answer within 50 ms/
    );
    assert.ok(Date.now() - started < 2000, "the timeout is the secret's, not a default");
  });

  it("has a short default timeout", () => {
    assert.ok(DEFAULT_TIMEOUT_MS > 0 && DEFAULT_TIMEOUT_MS <= 10000);
  });

  for (const name of ["IDSYNC_WEBHOOK_URL", "IDSYNC_INGEST_TOKEN"]) {
    it(`throws without calling idsync when ${name} is missing`, async () => {
      const calls = stubFetch(() => reply(202));
      await assert.rejects(onExecuteEventStream(event({ [name]: "" }), {}), new RegExp(name));
      assert.equal(calls.length, 0);
    });
  }

  for (const bad of ["0", "-5", "soon", "600000"]) {
    it(`refuses IDSYNC_TIMEOUT_MS=${bad}`, async () => {
      const calls = stubFetch(() => reply(202));
      await assert.rejects(
        onExecuteEventStream(event({ IDSYNC_TIMEOUT_MS: bad }), {}),
        /IDSYNC_TIMEOUT_MS/
      );
      assert.equal(calls.length, 0);
    });
  }

  it("throws on an event without a message", async () => {
    const calls = stubFetch(() => reply(202));
    await assert.rejects(
      onExecuteEventStream({ secrets: event().secrets }, {}),
      /no message with an id/
    );
    assert.equal(calls.length, 0);
  });
});

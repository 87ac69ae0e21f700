/**
 * Auth0 Event Stream Action: forward each event to idsync's webhook.
 *
 * For an Event Stream whose destination is an Action (type "action") instead of
 * a webhook. Auth0 runs `onExecuteEventStream` once per event; this Action posts
 * the event's CloudEvent (`event.message`) to idsync exactly as a webhook stream
 * would, so idsync validates, deduplicates and stores it the same way.
 *
 * Action secrets (Dashboard > Actions > this Action > Secrets):
 *   IDSYNC_WEBHOOK_URL   https://idsync.example.com/events/auth0
 *   IDSYNC_INGEST_TOKEN  one of idsync's INGEST_TOKEN values, sent as a Bearer token
 *   IDSYNC_TIMEOUT_MS    optional, how long one post may take (default 5000)
 *
 * Any answer but a 2xx, a timeout and a network error throw: Auth0's
 * "Create an Event Stream" page (section "Auth0 Actions") says a thrown error
 * is how an Action asks for a retry, and an Action that returns is marked
 * delivered. https://auth0.com/docs/customize/events/create-an-event-stream
 *
 * No npm dependency: the Actions runtime (Node 18 and later) has `fetch` and
 * `AbortSignal.timeout`.
 */

"use strict";

const DEFAULT_TIMEOUT_MS = 5000;
// The largest timeout accepted from the secret: an Action's execution is short-lived.
const MAX_TIMEOUT_MS = 15000;

/** The setting `name` from the Action's secrets, or a thrown error naming it. */
function requiredSecret(secrets, name) {
  const value = secrets && secrets[name];
  if (typeof value !== "string" || value.trim() === "") {
    throw new Error(`idsync forwarder: the Action secret ${name} is not set`);
  }
  return value.trim();
}

/** Milliseconds one post may take: IDSYNC_TIMEOUT_MS when it is a sane number. */
function timeoutMs(secrets) {
  const raw = secrets && secrets.IDSYNC_TIMEOUT_MS;
  if (raw === undefined || raw === null || String(raw).trim() === "") {
    return DEFAULT_TIMEOUT_MS;
  }
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0 || value > MAX_TIMEOUT_MS) {
    throw new Error(
      `idsync forwarder: IDSYNC_TIMEOUT_MS must be a number of milliseconds from 1 to ${MAX_TIMEOUT_MS}`
    );
  }
  return value;
}

/** The first few hundred characters of idsync's answer, for the Action's logs. */
async function excerpt(response) {
  try {
    const text = await response.text();
    return text.length > 300 ? `${text.slice(0, 300)}...` : text;
  } catch (error) {
    return "(no body)";
  }
}

/**
 * Post `message` to idsync and return its parsed answer; throw unless it is a 2xx.
 *
 * The token never appears in an error message: Action logs are visible to every
 * tenant administrator.
 */
async function forward(message, secrets) {
  const url = requiredSecret(secrets, "IDSYNC_WEBHOOK_URL");
  const token = requiredSecret(secrets, "IDSYNC_INGEST_TOKEN");
  if (!message || typeof message !== "object" || !message.id) {
    throw new Error("idsync forwarder: the event has no message with an id");
  }
  const limit = timeoutMs(secrets);
  let response;
  try {
    response = await fetch(url, {
      method: "POST",
      headers: {
        Authorization: `Bearer ${token}`,
        "Content-Type": "application/cloudevents+json",
      },
      body: JSON.stringify(message),
      signal: AbortSignal.timeout(limit),
    });
  } catch (error) {
    const why =
      error && (error.name === "TimeoutError" || error.name === "AbortError")
        ? `no answer within ${limit} ms`
        : `${(error && error.name) || "Error"}: ${(error && error.message) || error}`;
    throw new Error(`idsync forwarder: event ${message.id} not delivered: ${why}`);
  }
  if (response.status < 200 || response.status > 299) {
    const body = await excerpt(response);
    throw new Error(
      `idsync forwarder: event ${message.id} not delivered: idsync answered ${response.status}: ${body}`
    );
  }
  try {
    return await response.json();
  } catch (error) {
    return {};
  }
}

/**
 * Handler Auth0 calls for each event of the stream.
 * @param {Event} event - `event.message` is the CloudEvent, `event.secrets` the Action's secrets.
 * @param {EventStreamAPI} api - unused: a thrown error is the failure signal.
 */
exports.onExecuteEventStream = async (event, api) => {
  const answer = await forward(event && event.message, event && event.secrets);
  console.log(
    `idsync forwarder: event ${event.message.id} ${answer.status || "delivered"}`
  );
};

exports.forward = forward;
exports.DEFAULT_TIMEOUT_MS = DEFAULT_TIMEOUT_MS;

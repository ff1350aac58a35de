// Pieces shared by the views: the message area and the live change stream.
import { stream } from "../api.js";
import { h, replace } from "../dom.js";

// A line above the view for what just happened: the API's own error message, or a short confirmation.
export function messages() {
  const el = h("div", { id: "messages", "aria-live": "polite" });
  return {
    el,
    error(error) { replace(el, h("div", { class: "error", role: "alert" }, error.message || String(error))); },
    ok(text) { replace(el, h("div", { class: "notice" }, text)); },
    clear() { replace(el); },
  };
}

// Runs `action`; shows its error (as the API said it) or `done` in `msg`. Returns the action's result.
export async function attempt(msg, action, done) {
  try {
    const result = await action();
    if (done) msg.ok(typeof done === "function" ? done(result) : done);
    return result;
  } catch (error) {
    if (error.name !== "AbortError") msg.error(error);
    return undefined;
  }
}

// GET /v1/events, kept open: `onItem` gets the snapshot, then each change. Reconnects after a drop (a new
// snapshot comes first, so nothing is missed). `onLive(bool)` says whether it is connected. Returns stop().
export function liveEvents(onItem, onLive, onError) {
  let stopped = false;
  let controller = null;
  let delay = 500;
  (async () => {
    while (!stopped) {
      controller = new AbortController();
      try {
        await stream("GET", "/v1/events", (item) => {
          delay = 500;
          onLive(true);
          onItem(item);
        }, { signal: controller.signal });
      } catch (error) {
        if (stopped || error.name === "AbortError") return;
        if (error.status === 401 || error.code === "unauthenticated") return; // api.js signs the user out
        if (onError) onError(error);
      }
      onLive(false);
      if (stopped) return;
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return () => { stopped = true; if (controller) controller.abort(); };
}

export function stateBadge(state) {
  return h("span", { class: `badge ${state}` }, state);
}

// The qkvault viewer: asks for the API key once (kept in localStorage), then routes
// "#/" -> my jobs, "#/jobs/<id>" -> one job. No build step, no dependencies.

import { forgetKey, getKey, setKey, stats } from "./api.js";
import { h } from "./format.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";

// What the page's tests (tests/ui) and a curious user's console can read.
window.qkvault = { stats, heatmap: null };

const main = document.getElementById("main");
const account = document.getElementById("account");
let cleanup = null;

function keyForm(message) {
  const input = h("input", {
    type: "password",
    name: "api-key",
    id: "api-key",
    placeholder: "qk_…",
    autocomplete: "off",
    required: true,
  });
  const form = h(
    "form",
    { className: "key-form" },
    h("h2", {}, "API key"),
    message ? h("p", { className: "error" }, message) : null,
    h(
      "p",
      {},
      "The viewer calls the API with your key (sent as ",
      h("code", {}, "Authorization: Bearer"),
      "; kept in this browser's localStorage until you forget it). An administrator creates keys with ",
      h("code", {}, "qkvault keys create --owner NAME"),
      "; the embedded stack prints its own key at start.",
    ),
    h("label", { htmlFor: "api-key" }, "key "),
    input,
    h("button", { type: "submit" }, "Use this key"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!input.value.trim()) return;
    setKey(input.value);
    route();
  });
  return form;
}

function showAccount() {
  if (!getKey()) {
    account.replaceChildren();
    return;
  }
  const button = h("button", { type: "button", className: "forget-key" }, "forget key");
  button.addEventListener("click", () => {
    forgetKey();
    route();
  });
  account.replaceChildren(button);
}

function route(message) {
  cleanup?.();
  cleanup = null;
  showAccount();
  if (!getKey()) {
    main.replaceChildren(keyForm(message));
    return;
  }
  const match = /^#\/jobs\/([^/]+)$/.exec(location.hash);
  cleanup = match ? jobView(main, decodeURIComponent(match[1])) : jobsView(main);
}

window.addEventListener("hashchange", () => route());
window.addEventListener("qkvault:unauthorized", (event) => {
  forgetKey();
  route(`The API refused the key: ${event.detail.message}`);
});
route();

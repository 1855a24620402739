// The generated text of one sequence, token by token: prompt and generated tokens told apart, and
// on hover the token alternatives the bundle stores (topk_tokens / topk_logprobs / logprob,
// docs/bundle-format.md), read with the slices route as JSON.

import { getJson, jobPath, query } from "./api.js";
import { h } from "./format.js";

const JSON_VALUES_MAX = 65536; // the API's default QKVAULT_JSON_SLICE_MAX_VALUES
export const MAX_TEXT_TOKENS = 4096; // tokens shown (and alternatives read) per sequence

async function slice(jobId, name, params) {
  return getJson(jobPath(jobId, `/arrays/${name}${query({ ...params, format: "json" })}`));
}

/**
 * Render sequence `seq` into `target`.
 * @param {object} ctx jobId, names (Set of "group/name" of the bundle's arrays), arrays (by name)
 * @param {string[]} strings the decoded string of each token of the sequence
 */
export async function renderText(target, ctx, seq, strings) {
  const { jobId, names, arrays } = ctx;
  const shown = strings.slice(0, MAX_TEXT_TOKENS);
  let promptLength = null;
  if (names.has("prompt_length")) {
    promptLength = (await slice(jobId, "prompt_length", { seq })).data;
  }
  let alternatives = null;
  if (names.has("topk_tokens") || names.has("topk_ids")) {
    const textual = names.has("topk_tokens");
    const rank = arrays.get(textual ? "topk_tokens" : "topk_ids").shape.at(-1);
    const positions = Math.min(shown.length, Math.floor(JSON_VALUES_MAX / Math.max(rank, 1)));
    const range = { seq, position: `0:${positions}` };
    const [tokens, logprobs, chosen] = await Promise.all([
      slice(jobId, textual ? "topk_tokens" : "topk_ids", range),
      names.has("topk_logprobs") ? slice(jobId, "topk_logprobs", range) : null,
      names.has("logprob") ? slice(jobId, "logprob", range) : null,
    ]);
    alternatives = { tokens: tokens.data, logprobs: logprobs?.data, chosen: chosen?.data, positions };
  }

  const popup = h("div", { className: "alternatives", hidden: true });
  const text = h("div", { className: "tokens" });
  shown.forEach((token, position) => {
    const generated = promptLength !== null && position >= promptLength;
    const span = h(
      "span",
      { className: `token${generated ? " generated" : ""}`, dataset: { position: String(position) } },
      token,
    );
    text.append(span);
  });
  const showAlternatives = (span) => {
    const position = Number(span.dataset.position);
    if (!alternatives || position >= alternatives.positions) {
      popup.hidden = true;
      return;
    }
    const rows = (alternatives.tokens[position] || [])
      .map((candidate, rank) => ({ candidate, logprob: alternatives.logprobs?.[position]?.[rank] }))
      .filter(({ candidate, logprob }) => candidate !== "" && candidate !== -1 && logprob !== null);
    const chosen = alternatives.chosen?.[position];
    popup.replaceChildren(
      h(
        "div",
        { className: "alt-head" },
        `position ${position}: ${JSON.stringify(shown[position])}`,
        chosen !== null && chosen !== undefined ? ` p=${Math.exp(chosen).toFixed(3)}` : "",
      ),
      rows.length
        ? h(
            "table",
            {},
            ...rows.map(({ candidate, logprob }, rank) =>
              h(
                "tr",
                { className: "alt-row" },
                h("td", {}, String(rank + 1)),
                h("td", { className: "alt-token" }, JSON.stringify(candidate)),
                h("td", {}, logprob === undefined ? "" : Math.exp(logprob).toFixed(3)),
              ),
            ),
          )
        : h("div", { className: "hint" }, "no alternatives stored for this position"),
    );
    popup.hidden = false;
    const box = span.getBoundingClientRect();
    const parent = target.getBoundingClientRect();
    popup.style.left = `${box.left - parent.left}px`;
    popup.style.top = `${box.bottom - parent.top + 4}px`;
  };
  text.addEventListener("mouseover", (event) => {
    const span = event.target.closest?.(".token");
    if (span) showAlternatives(span);
  });
  text.addEventListener("mouseleave", () => {
    popup.hidden = true;
  });
  const notes = [];
  if (promptLength !== null) notes.push("generated tokens are highlighted");
  notes.push(alternatives ? "hover a token for the alternatives the model considered" : "no token alternatives in this bundle (capture.alternatives)");
  if (strings.length > shown.length) notes.push(`first ${shown.length} of ${strings.length} tokens`);
  target.replaceChildren(h("p", { className: "hint" }, notes.join(" · ")), text, popup);
}

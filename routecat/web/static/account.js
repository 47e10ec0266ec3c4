// The account page: create a key, show the balance, top up and watch the invoice.
// The key stays in memory; it goes to localStorage only if the user ticks "remember".
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = null;
let watching = null;

function show(el, text) { el.textContent = text; el.hidden = false; }
function hide(el) { el.hidden = true; }

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (apiKey) headers.Authorization = "Bearer " + apiKey;
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || ("HTTP " + response.status);
    throw new Error(message);
  }
  return body;
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch (err) {
    button.textContent = "Select and copy";
  }
}

$("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  hide($("create-error"));
  try {
    const body = await api("/v1/auth/register", { method: "POST", body: JSON.stringify({ name: $("key-name").value }) });
    $("new-key-value").textContent = body.api_key;
    $("new-key").hidden = false;
    $("api-key").value = body.api_key;
  } catch (err) {
    show($("create-error"), err.message);
  }
});

$("copy-key").addEventListener("click", () => copy($("new-key-value").textContent, $("copy-key")));
$("copy-invoice").addEventListener("click", () => copy($("invoice-text").textContent, $("copy-invoice")));

async function refreshBalance() {
  const body = await api("/v1/auth/balance");
  $("balance-sats").textContent = String(body.balance_sats);
  $("free-remaining").textContent = String(body.free_remaining);
  $("balance").hidden = false;
  $("topup-section").hidden = false;
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  hide($("key-error"));
  apiKey = $("api-key").value.trim();
  if ($("remember").checked) localStorage.setItem("routecat_api_key", apiKey);
  else localStorage.removeItem("routecat_api_key");
  try {
    await refreshBalance();
  } catch (err) {
    show($("key-error"), err.message);
  }
});

$("topup-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  hide($("topup-error"));
  try {
    const body = await api("/v1/auth/topup", { method: "POST", body: JSON.stringify({ amount_sats: Number($("amount").value) }) });
    $("invoice-text").textContent = body.invoice;
    $("invoice-qr").src = "/qr.svg?data=" + encodeURIComponent(body.invoice);
    $("invoice-status").textContent = "pending";
    $("invoice").hidden = false;
    watch(body.payment_hash);
  } catch (err) {
    show($("topup-error"), err.message);
  }
});

function watch(paymentHash) {
  if (watching) clearInterval(watching);
  watching = setInterval(async () => {
    try {
      const body = await api("/v1/auth/topup/" + paymentHash);
      $("invoice-status").textContent = body.status;
      if (body.status !== "pending") {
        clearInterval(watching);
        watching = null;
        await refreshBalance();
      }
    } catch (err) {
      show($("topup-error"), err.message);
    }
  }, 1000);
}

const remembered = localStorage.getItem("routecat_api_key");
if (remembered) {
  $("api-key").value = remembered;
  $("remember").checked = true;
}

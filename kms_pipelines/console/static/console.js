// The KMS console's only script: WebAuthn ceremonies (sign-in, registration, step-up).
// Forms marked data-webauthn post JSON {handle, credential, ...fields} after the key answers.
"use strict";

function csrf() {
  const m = document.querySelector('meta[name="csrf-token"]');
  return m ? m.content : "";
}

async function postJSON(url, body) {
  const resp = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()},
    body: JSON.stringify(body),
  });
  let data = {};
  try { data = await resp.json(); } catch (e) { data = {error: `HTTP ${resp.status}`}; }
  if (!resp.ok) throw new Error(data.error || `HTTP ${resp.status}`);
  return data;
}

function say(form, text, ok) {
  const out = form.querySelector("[role=status], [role=alert]") || document.getElementById("status");
  if (!out) return;
  out.setAttribute("role", ok ? "status" : "alert");
  out.textContent = text;
  out.className = ok ? "status ok" : "status error";
  if (!ok) out.focus();
}

async function ceremony(form) {
  const fields = Object.fromEntries(new FormData(form).entries());
  const begin = await postJSON(form.dataset.begin, fields);
  let credential;
  try {
    if (form.dataset.webauthn === "create") {
      const options = PublicKeyCredential.parseCreationOptionsFromJSON(begin.options.publicKey);
      credential = await navigator.credentials.create({publicKey: options});
    } else {
      const options = PublicKeyCredential.parseRequestOptionsFromJSON(begin.options.publicKey);
      credential = await navigator.credentials.get({publicKey: options});
    }
  } catch (e) {
    throw new Error(`the security key did not answer (${e.name})`);
  }
  return postJSON(form.getAttribute("action"), {...fields, handle: begin.handle, credential: credential.toJSON()});
}

document.addEventListener("submit", async (event) => {
  const form = event.target;
  if (!form.dataset.webauthn) return;
  event.preventDefault();
  const button = form.querySelector("button[type=submit]");
  if (button) button.disabled = true;
  say(form, "Touch your security key…", true);
  try {
    const result = await ceremony(form);
    say(form, result.message || "Done.", true);
    if (result.link) {
      const out = document.getElementById("issued-link");
      if (out) { out.hidden = false; out.querySelector("code").textContent = result.link; }
    }
    if (result.next) window.location.assign(result.next);
  } catch (e) {
    say(form, e.message, false);
  } finally {
    if (button) button.disabled = false;
  }
});

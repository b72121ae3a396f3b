// Trades the master key for a session cookie; the key itself is kept nowhere.
const form = document.getElementById("login");
const error = document.getElementById("login-error");
document.getElementById("login-button").disabled = false;

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.hidden = true;
  const input = document.getElementById("key");
  let response;
  try {
    response = await fetch("/dashboard/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key: input.value }),
    });
  } catch (e) {
    show("The gateway did not answer.");
    return;
  }
  input.value = "";
  if (response.status === 204) {
    // Back to the page asked for before the login (the redirect keeps the #fragment).
    location.assign(`/dashboard/${location.hash}`);
    return;
  }
  const body = await response.json().catch(() => null);
  show(body?.error?.message ?? `Login failed (${response.status}).`);
});

function show(message) {
  error.textContent = message;
  error.hidden = false;
}

/* Live preview on Clarion's template change form: sends the form's raw texts to the admin's
   preview endpoint (debounced) and shows each channel as a notification would render it, or
   what is wrong with it. No dependencies; the server does all parsing and rendering. */
(function () {
  "use strict";

  const DEBOUNCE_MS = 300;
  // The form fields the preview depends on; the preview's own controls are added below.
  const WATCHED = ["id_content", "id_translations", "id_sample_data", "id_locale"];

  function node(tag, attributes, text) {
    const element = document.createElement(tag);
    Object.entries(attributes || {}).forEach(([name, value]) => element.setAttribute(name, value));
    if (text !== undefined) {
      element.textContent = text; // never innerHTML: rendered text is shown, not interpreted
    }
    return element;
  }

  function errorList(errors) {
    const list = node("ul", { class: "errorlist" });
    Object.entries(errors).forEach(([field, problems]) => {
      problems.forEach((problem) => list.append(node("li", {}, `${field}: ${problem}`)));
    });
    return list;
  }

  function start() {
    const panel = document.getElementById("clarion-preview");
    if (!panel) {
      return;
    }
    const form = panel.closest("form");
    const output = panel.querySelector(".clarion-preview-output");
    const channel = document.getElementById("clarion-preview-channel");
    const locale = document.getElementById("clarion-preview-locale");
    const labels = {};
    Array.from(channel.options).forEach((option) => {
      labels[option.value] = option.textContent;
    });
    let timer = null;
    let latest = 0;

    function value(id) {
      const element = document.getElementById(id);
      return element ? element.value : "";
    }

    function show(result) {
      output.replaceChildren();
      output.dataset.state = result.ok ? "ok" : "error";
      if (result.locale) {
        output.append(node("p", { class: "clarion-preview-locale" }, `Locale: ${result.locale}`));
      }
      if (Object.keys(result.errors).length) {
        output.append(errorList(result.errors));
      }
      Object.entries(result.channels).forEach(([name, rendered]) => {
        const section = node("section", {
          class: "clarion-preview-channel",
          "data-channel": name,
          "data-state": rendered.ok ? "ok" : "error",
        });
        section.append(node("h3", {}, labels[name] || name));
        if (!rendered.ok) {
          section.append(errorList(rendered.errors));
        } else {
          const fields = node("dl");
          Object.entries(rendered.fields).forEach(([field, text]) => {
            fields.append(node("dt", {}, field));
            const cell = node("dd", { "data-field": field });
            if (name === "email" && field === "html") {
              // An empty sandbox: the email's HTML is drawn, its scripts and links stay inert.
              cell.append(node("iframe", { sandbox: "", srcdoc: text, title: "Email HTML" }));
            } else {
              cell.append(node("pre", {}, text));
            }
            fields.append(cell);
          });
          section.append(fields);
        }
        output.append(section);
      });
    }

    function fail(message) {
      output.replaceChildren(node("ul", { class: "errorlist" }));
      output.firstChild.append(node("li", {}, message));
      output.dataset.state = "failed";
    }

    function refresh() {
      const body = new FormData();
      body.append("content", value("id_content"));
      body.append("translations", value("id_translations"));
      body.append("sample_data", value("id_sample_data"));
      body.append("default_locale", value("id_locale"));
      body.append("locale", locale.value);
      body.append("channel", channel.value);
      const token = form.querySelector("[name=csrfmiddlewaretoken]").value;
      latest += 1;
      const mine = latest;
      output.setAttribute("aria-busy", "true");
      fetch(panel.dataset.previewUrl, {
        method: "POST",
        body: body,
        credentials: "same-origin",
        headers: { "X-CSRFToken": token, Accept: "application/json" },
      })
        .then((response) => {
          const type = response.headers.get("Content-Type") || "";
          if (!response.ok || !type.startsWith("application/json")) {
            throw new Error(
              `The preview is unavailable (HTTP ${response.status}); reload the page, ` +
                "signing in again if asked.",
            );
          }
          return response.json();
        })
        .then((result) => {
          if (mine === latest) {
            show(result);
          }
        })
        .catch((error) => {
          if (mine === latest) {
            fail(error.message);
          }
        })
        .finally(() => {
          if (mine === latest) {
            output.removeAttribute("aria-busy");
          }
        });
    }

    function schedule() {
      window.clearTimeout(timer);
      timer = window.setTimeout(refresh, DEBOUNCE_MS);
    }

    WATCHED.forEach((id) => {
      const element = document.getElementById(id);
      if (element) {
        element.addEventListener("input", schedule);
      }
    });
    channel.addEventListener("change", refresh);
    locale.addEventListener("input", schedule);
    refresh();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();

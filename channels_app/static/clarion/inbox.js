/*
 * The demo inbox page: a bell with the unread count, the list (newest first), live
 * notifications on top, click to mark read, and a preferences panel (channels, categories,
 * quiet hours) on the recipient's own preferences. The recipient token comes in the URL fragment
 * (#token=...), which the browser never sends to the server.
 */
(function () {
  "use strict";

  var list = document.getElementById("inbox-list");
  var badge = document.getElementById("unread-count");
  var connection = document.getElementById("connection");
  var message = document.getElementById("message");

  function takeToken() {
    var match = /(?:^|[#&])token=([^&]+)/.exec(window.location.hash);
    if (match) {
      var token = decodeURIComponent(match[1]);
      window.sessionStorage.setItem("clarion-token", token);
      // Out of the address bar and the history, so it is not shared by copying the URL.
      window.history.replaceState(null, "", window.location.pathname);
      return token;
    }
    return window.sessionStorage.getItem("clarion-token");
  }

  function show(text) {
    message.textContent = text;
    message.hidden = false;
  }

  function setCount(count) {
    badge.textContent = String(count);
    badge.setAttribute("data-count", String(count));
  }

  function setState(state, text) {
    connection.setAttribute("data-state", state);
    connection.textContent = text;
  }

  function entryElement(entry) {
    var item = document.createElement("li");
    item.className = "entry" + (entry.status === "read" ? " read" : " unread");
    item.setAttribute("data-id", entry.id);
    item.setAttribute("data-created-at", entry.created_at);
    var title = document.createElement("div");
    title.className = "title";
    title.textContent = entry.title;
    var body = document.createElement("div");
    body.className = "body";
    body.textContent = entry.body;
    var time = document.createElement("time");
    time.dateTime = entry.created_at;
    time.textContent = new Date(entry.created_at).toLocaleString();
    item.appendChild(title);
    item.appendChild(body);
    item.appendChild(time);
    return item;
  }

  function place(entry) {
    if (list.querySelector('[data-id="' + entry.id + '"]')) return;
    var item = entryElement(entry);
    // Newest first, whether it came from the list request or live.
    var after = Array.prototype.find.call(list.children, function (other) {
      return other.getAttribute("data-created-at") < entry.created_at;
    });
    list.insertBefore(item, after || null);
  }

  var token = takeToken();
  if (!token) {
    setState("offline", "no token");
    show("Open this page as /inbox/#token=<recipient token> " +
         "(POST /api/v1/recipients/{id}/token gives one).");
    return;
  }

  var client = new window.Clarion.Client({token: token});
  client.on("unread-count", setCount);
  client.on("notification", function (frame) {
    place({id: frame.id, title: frame.title, body: frame.body,
           created_at: frame.created_at, status: "delivered"});
  });
  client.on("connected", function () {
    setState("live", "live");
    client.list().then(function (page) { page.results.forEach(place); });
  });
  client.on("disconnected", function () { setState("connecting", "reconnecting…"); });
  client.on("auth-failed", function () {
    setState("offline", "token refused");
    show("The token was refused (expired?). Ask for a new one.");
  });

  list.addEventListener("click", function (event) {
    var item = event.target.closest(".entry.unread");
    if (!item) return;
    client.markRead(item.getAttribute("data-id")).then(function () {
      item.className = "entry read";
    });
  });
  document.getElementById("read-all").addEventListener("click", function () {
    client.markAllRead().then(function () {
      Array.prototype.forEach.call(list.querySelectorAll(".entry.unread"), function (item) {
        item.className = "entry read";
      });
    });
  });

  // --- preferences panel ----------------------------------------------------------------

  var CHANNEL_NAMES = {email: "Email", sms: "SMS", push: "Push", web: "In the browser"};
  var panel = document.getElementById("preferences");
  var toggle = document.getElementById("preferences-toggle");
  var status = document.getElementById("preferences-status");
  var quietOn = document.getElementById("quiet-on");
  var quietStart = document.getElementById("quiet-start");
  var quietEnd = document.getElementById("quiet-end");
  var shown = null;  // the document last read or saved

  function switchElement(text, checked, data) {
    var label = document.createElement("label");
    var input = document.createElement("input");
    input.type = "checkbox";
    input.checked = checked;
    Object.keys(data).forEach(function (key) { input.setAttribute("data-" + key, data[key]); });
    label.appendChild(input);
    label.appendChild(document.createTextNode(" " + text));
    return label;
  }

  function clear(container, selector) {
    Array.prototype.forEach.call(container.querySelectorAll(selector), function (element) {
      element.remove();
    });
  }

  function renderPreferences(prefs) {
    shown = prefs;
    var channels = Object.keys(prefs.channels);
    var channelSet = document.getElementById("preferences-channels");
    clear(channelSet, "label");
    channels.forEach(function (channel) {
      channelSet.appendChild(switchElement(CHANNEL_NAMES[channel] || channel,
                                           prefs.channels[channel], {channel: channel}));
    });
    var categorySet = document.getElementById("preferences-categories");
    clear(categorySet, ".category");
    var names = (prefs.template_categories || []).slice();
    Object.keys(prefs.categories).forEach(function (name) {
      if (names.indexOf(name) < 0) names.push(name);
    });
    names.sort();
    categorySet.hidden = names.length === 0;
    names.forEach(function (name) {
      var rules = prefs.categories[name] || {};
      var row = document.createElement("div");
      row.className = "category";
      row.setAttribute("data-category", name);
      var title = document.createElement("span");
      title.textContent = name;
      row.appendChild(title);
      channels.forEach(function (channel) {
        var on = Object.prototype.hasOwnProperty.call(rules, channel) ? rules[channel] : true;
        row.appendChild(switchElement(CHANNEL_NAMES[channel] || channel, on,
                                      {category: name, channel: channel}));
      });
      categorySet.appendChild(row);
    });
    quietOn.checked = Boolean(prefs.quiet_hours);
    if (prefs.quiet_hours) {
      quietStart.value = prefs.quiet_hours.start;
      quietEnd.value = prefs.quiet_hours.end;
    }
  }

  function preferencesDocument() {
    var body = {channels: {}, categories: {}, quiet_hours: null};
    Array.prototype.forEach.call(panel.querySelectorAll("input[data-channel]"), function (input) {
      var channel = input.getAttribute("data-channel");
      var category = input.getAttribute("data-category");
      if (category === null) {
        body.channels[channel] = input.checked;
        return;
      }
      // A category rule is sent when it says no, or when one was set before (to lift it).
      var before = shown.categories[category] || {};
      if (!input.checked || Object.prototype.hasOwnProperty.call(before, channel)) {
        body.categories[category] = body.categories[category] || {};
        body.categories[category][channel] = input.checked;
      }
    });
    if (quietOn.checked) {
      body.quiet_hours = {start: quietStart.value, end: quietEnd.value};
      if (shown.quiet_hours && shown.quiet_hours.channels) {
        body.quiet_hours.channels = shown.quiet_hours.channels;
      }
    }
    return body;
  }

  toggle.addEventListener("click", function () {
    var opening = panel.hidden;
    panel.hidden = !opening;
    toggle.setAttribute("aria-expanded", String(opening));
    if (opening) {
      status.textContent = "loading…";
      client.preferences().then(function (prefs) {
        renderPreferences(prefs);
        status.textContent = "";
      }, function () { status.textContent = "could not load your preferences"; });
    }
  });
  panel.addEventListener("submit", function (event) {
    event.preventDefault();
    status.textContent = "saving…";
    client.updatePreferences(preferencesDocument()).then(function (prefs) {
      renderPreferences(prefs);
      status.textContent = "Saved";
    }, function () { status.textContent = "not saved: please check the times"; });
  });

  client.start();
})();

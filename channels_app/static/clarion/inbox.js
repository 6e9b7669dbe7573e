/*
 * The demo inbox page: a bell with the unread count, the list (newest first), live
 * notifications on top, click to mark read. The recipient token comes in the URL fragment
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

  client.start();
})();

/*
 * Clarion browser client: a recipient's live in-app notifications, with no dependencies.
 *
 *   var client = new Clarion.Client({token: "<recipient token>"});
 *   client.on("notification", function (n) { ... });   // {id, title, body, data, created_at}
 *   client.on("unread-count", function (count) { ... });
 *   client.start();
 *
 * It authenticates with its first frame (the token never sits in a URL), acks every
 * notification, takes the server's pings as signs of life (no answer is needed), and
 * reconnects with exponential backoff, resuming with `since` = the inbox position up to
 * which it has seen every notification (positions are the server's, increasing per
 * recipient; frames may come out of order). The inbox API calls (markRead, markAllRead,
 * archive, list, preferences, updatePreferences) use the same token.
 *
 * Events: "connected", "disconnected" ({code, reason}), "notification" (frame),
 * "unread-count" (number), "auth-failed", "error" (frame or Error).
 */
(function (root) {
  "use strict";

  var CLOSE_UNAUTHENTICATED = 4401;

  function Client(options) {
    if (!options || !options.token) {
      throw new Error("Clarion.Client needs {token}");
    }
    var origin = options.baseUrl || root.location.origin;
    this.token = options.token;
    // Optional: function returning a Promise of a fresh token, asked when the server
    // refuses the current one (it expired); without it the client stops and emits
    // "auth-failed".
    this.getToken = options.getToken || null;
    this.apiBase = origin + "/api/v1";
    this.wsUrl = options.wsUrl || origin.replace(/^http/, "ws") + "/ws/notifications/";
    // Every position up to `since` seen, and `early`: those above it that came before a
    // gap below them was filled (channels_app/positions.py keeps the same record).
    this.since = options.since || 0;
    this.early = {};
    this.earlyCount = 0;
    this.maxEarly = options.maxEarly || 5000;
    this.autoAck = options.autoAck !== false;
    this.minBackoffMs = options.minBackoffMs || 500;
    this.maxBackoffMs = options.maxBackoffMs || 30000;
    // The server pings every 25 s; a socket silent for longer than this is dead even if
    // the browser has not noticed (sleep, a network switch).
    this.silenceLimitMs = options.silenceLimitMs || 60000;
    this.handlers = {};
    this.attempt = 0;
    this.socket = null;
    this.stopped = true;
    this.reconnectTimer = null;
    this.silenceTimer = null;
    this.countTimer = null;
  }

  Client.prototype.on = function (event, handler) {
    (this.handlers[event] = this.handlers[event] || []).push(handler);
    return this;
  };

  Client.prototype.off = function (event, handler) {
    this.handlers[event] = (this.handlers[event] || []).filter(function (h) {
      return h !== handler;
    });
    return this;
  };

  Client.prototype.emit = function (event, payload) {
    (this.handlers[event] || []).slice().forEach(function (handler) {
      try {
        handler(payload);
      } catch (err) {
        if (root.console) root.console.error(err);
      }
    });
  };

  Client.prototype.start = function () {
    this.stopped = false;
    this._open();
    return this;
  };

  Client.prototype.stop = function () {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.silenceTimer);
    if (this.socket) this.socket.close(1000);
  };

  Client.prototype._open = function () {
    var self = this;
    var socket = new root.WebSocket(this.wsUrl);
    this.socket = socket;
    socket.onopen = function () {
      var auth = {type: "auth", token: self.token};
      if (self.since) auth.since = self.since;
      socket.send(JSON.stringify(auth));
      self._watchSilence();
    };
    socket.onmessage = function (event) {
      var frame;
      try {
        frame = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      self._watchSilence();
      self._onFrame(frame);
    };
    socket.onclose = function (event) {
      if (self.socket !== socket) return;
      clearTimeout(self.silenceTimer);
      self.socket = null;
      self.emit("disconnected", {code: event.code, reason: event.reason});
      if (!self.stopped) self._reconnect(event.code);
    };
  };

  Client.prototype._send = function (frame) {
    if (this.socket && this.socket.readyState === root.WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
    }
  };

  Client.prototype._onFrame = function (frame) {
    switch (frame.type) {
      case "ready":
        // Everything up to frame.position has been sent (the catch-up is over).
        this._advance(frame.position || 0);
        this.attempt = 0;
        this.emit("connected");
        this.refreshUnreadCount();
        break;
      case "notification":
        if (this.autoAck) this._send({type: "ack", id: frame.id});
        // The server sends a position once per connection; this also drops one seen on an
        // earlier connection (a frame the catch-up carried and a retry pushed again).
        if (!this._see(frame.position)) return;
        this.emit("notification", frame);
        this._scheduleCount();
        break;
      case "ping":
        // Only a sign of life (it reset the silence watch above): no answer is needed.
        break;
      case "error":
        this.emit("error", frame);
        break;
    }
  };

  // True when `position` had not been seen.
  Client.prototype._see = function (position) {
    if (position <= this.since || this.early[position]) return false;
    this.early[position] = true;
    this.earlyCount += 1;
    if (this.earlyCount > this.maxEarly) {
      // A gap that never fills (its delivery was never pushed) is closed over.
      this._advance(Math.min.apply(null, Object.keys(this.early).map(Number)) - 1);
    }
    this._closeUp();
    return true;
  };

  Client.prototype._advance = function (position) {
    if (position <= this.since) return;
    this.since = position;
    var early = this.early;
    var self = this;
    this.early = {};
    this.earlyCount = 0;
    Object.keys(early).forEach(function (key) {
      if (Number(key) > position) {
        self.early[key] = true;
        self.earlyCount += 1;
      }
    });
    this._closeUp();
  };

  Client.prototype._closeUp = function () {
    while (this.early[this.since + 1]) {
      delete this.early[this.since + 1];
      this.earlyCount -= 1;
      this.since += 1;
    }
  };

  Client.prototype._watchSilence = function () {
    var self = this;
    clearTimeout(this.silenceTimer);
    this.silenceTimer = setTimeout(function () {
      if (self.socket) self.socket.close(4000, "silent");
    }, this.silenceLimitMs);
  };

  Client.prototype._reconnect = function (code) {
    var self = this;
    if (code === CLOSE_UNAUTHENTICATED) {
      if (!this.getToken) {
        this.stopped = true;
        this.emit("auth-failed");
        return;
      }
    }
    // Exponential backoff with jitter, so a restarted server is not hit by every tab at once.
    var ceiling = Math.min(this.maxBackoffMs, this.minBackoffMs * Math.pow(2, this.attempt));
    var delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.attempt += 1;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(function () {
      if (self.stopped) return;
      if (code === CLOSE_UNAUTHENTICATED) {
        Promise.resolve(self.getToken()).then(
          function (token) {
            self.token = token;
            self._open();
          },
          function () {
            self._reconnect(code);
          }
        );
      } else {
        self._open();
      }
    }, delay);
  };

  // --- inbox API ----------------------------------------------------------------------------

  Client.prototype.api = function (method, path, body) {
    var self = this;
    var headers = {Authorization: "Bearer " + this.token, Accept: "application/json"};
    var request = {method: method, headers: headers};
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      request.body = JSON.stringify(body);
    }
    return root
      .fetch(this.apiBase + path, request)
      .then(function (response) {
        if (!response.ok) {
          var error = new Error(method + " " + path + ": " + response.status);
          error.status = response.status;
          self.emit("error", error);
          throw error;
        }
        return response.json();
      });
  };

  Client.prototype.refreshUnreadCount = function () {
    var self = this;
    return this.api("GET", "/inbox/unread-count").then(function (body) {
      self.emit("unread-count", body.count);
      return body.count;
    });
  };

  Client.prototype._scheduleCount = function () {
    var self = this;
    // One count request for a burst of notifications (a backlog on reconnect).
    clearTimeout(this.countTimer);
    this.countTimer = setTimeout(function () {
      self.refreshUnreadCount().catch(function () {});
    }, 50);
  };

  Client.prototype.list = function (params) {
    var query = new URLSearchParams(params || {}).toString();
    return this.api("GET", "/inbox" + (query ? "?" + query : ""));
  };

  Client.prototype.markRead = function (id) {
    var self = this;
    return this.api("POST", "/inbox/" + encodeURIComponent(id) + "/read").then(function (entry) {
      self.refreshUnreadCount().catch(function () {});
      return entry;
    });
  };

  Client.prototype.markAllRead = function () {
    var self = this;
    return this.api("POST", "/inbox/read-all").then(function (body) {
      self.refreshUnreadCount().catch(function () {});
      return body;
    });
  };

  Client.prototype.archive = function (id) {
    var self = this;
    return this.api("POST", "/inbox/" + encodeURIComponent(id) + "/archive").then(function (e) {
      self.refreshUnreadCount().catch(function () {});
      return e;
    });
  };

  // The recipient's own preferences: {channels: {email: true, ...}, categories: {marketing:
  // {email: false}}, quiet_hours: {start, end, channels} | null, template_categories: [...]}.
  Client.prototype.preferences = function () {
    return this.api("GET", "/inbox/preferences");
  };

  // A partial document: what it does not name keeps its value; quiet_hours null removes them.
  Client.prototype.updatePreferences = function (document) {
    return this.api("PUT", "/inbox/preferences", document);
  };

  root.Clarion = {Client: Client};
})(window);

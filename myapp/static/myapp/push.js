/*
 * push.js: one EventSource per page, resumed without loss.
 *
 *   var stream = new PushStream("/events/", {onstate: function (state) {...}});
 *   stream.on("job.progress", function (data, event) {...});
 *
 * - Uses window.EventSource: the browser's own, or the vendored polyfill
 *   (static/myapp/vendor/eventsource.min.js) where the browser has none.
 * - States: "connecting", "live", "reconnecting", "closed".
 * - Data is parsed as JSON (pass {json: false} to get the raw string).
 * - While the EventSource reconnects by itself it sends Last-Event-ID.
 *   When it gives up (any non-200 answer stops it, WHATWG HTML 9.2.3), this
 *   script asks the server with ?check=1 whether to retry (503, 429, network
 *   errors: again after a jittered, growing delay) or stop (204, 400, 401,
 *   403), and reconnects with ?lastEventId= so nothing is lost.
 * - "stream.close" closes the stream for good; "stream.reset" means the page
 *   missed events it can no longer get: onreset() should reload its state.
 * - "stream.end" (the server ended the stream: myapp.control) stops for good
 *   when its data says {"reconnect": false} (onend(data) is called either way);
 *   with {"reconnect": true} the page reconnects at once and is authorized again.
 */
(function (global) {
  "use strict";

  var CLOSED = 2;

  function withParam(url, name, value) {
    return url + (url.indexOf("?") === -1 ? "?" : "&") + name + "=" + encodeURIComponent(value);
  }

  function PushStream(url, options) {
    options = options || {};
    this.url = url;
    this.options = options;
    this.lastEventId = options.lastEventId || "";
    this.state = null;
    this.source = null;
    this.transport = global.EventSource && global.EventSource.toString().indexOf("[native code]") !== -1 ? "native" : "polyfill";
    this._handlers = {};
    this._attempt = 0;
    this._timer = null;
    this._closed = false;
    this._baseDelay = options.retryMs || 1000;
    this._maxDelay = options.maxRetryMs || 30000;
    var self = this;
    this.on("stream.open", function () {
      self._attempt = 0;
      self._setState("live");
    });
    this.on("stream.reset", function (data) {
      self._attempt = 0;
      self._setState("live");
      if (self.options.onreset) self.options.onreset(data);
    });
    this.on("stream.close", function () {
      self.close();
    });
    this.on("stream.end", function (data) {
      if (self.options.onend) self.options.onend(data);
      if (data && data.reconnect === false) {
        self.close();
      } else if (self.source) {
        self.source.close();
        self._connect();
      }
    });
    this._connect();
  }

  PushStream.prototype.on = function (type, handler) {
    if (!this._handlers[type]) {
      this._handlers[type] = [];
      if (this.source) this._listen(this.source, type);
    }
    this._handlers[type].push(handler);
    return this;
  };

  PushStream.prototype.close = function () {
    this._closed = true;
    clearTimeout(this._timer);
    if (this.source) this.source.close();
    this._setState("closed");
  };

  PushStream.prototype._setState = function (state) {
    if (state === this.state) return;
    this.state = state;
    if (this.options.onstate) this.options.onstate(state);
  };

  PushStream.prototype._listen = function (source, type) {
    var self = this;
    source.addEventListener(type, function (event) {
      if (source !== self.source) return;
      if (event.lastEventId) self.lastEventId = event.lastEventId;
      var data = event.data;
      if (self.options.json !== false) {
        try {
          data = JSON.parse(data);
        } catch (e) {
          /* not JSON: hand over the string */
        }
      }
      var handlers = self._handlers[type] || [];
      for (var i = 0; i < handlers.length; i++) handlers[i](data, event);
    });
  };

  PushStream.prototype._connect = function () {
    if (this._closed) return;
    this._setState(this._attempt === 0 && !this.lastEventId ? "connecting" : "reconnecting");
    var url = this.lastEventId ? withParam(this.url, "lastEventId", this.lastEventId) : this.url;
    var EventSourceImpl = global.EventSource;
    var source = new EventSourceImpl(url, {withCredentials: !!this.options.withCredentials});
    this.source = source;
    for (var type in this._handlers) {
      if (Object.prototype.hasOwnProperty.call(this._handlers, type)) this._listen(source, type);
    }
    var self = this;
    source.onerror = function () {
      if (source !== self.source || self._closed) return;
      if (source.readyState === CLOSED) {
        self._gaveUp(source);
      } else {
        self._setState("reconnecting");  // the EventSource retries by itself
      }
    };
  };

  PushStream.prototype._gaveUp = function (source) {
    source.close();
    this._attempt += 1;
    this._setState("reconnecting");
    var self = this;
    var check = withParam(this.url, "check", "1");
    var request = global.fetch ? global.fetch(check, {credentials: this.options.withCredentials ? "include" : "same-origin"}) : null;
    if (!request) {
      this._retryLater();
      return;
    }
    request.then(
      function (response) {
        if (self._closed) return;
        if (response.status === 200 || response.status === 429 || response.status >= 500) {
          self._retryLater();
        } else {
          // 204: nothing to stream any more; 400/401/403: retrying cannot help.
          self.failure = response.status;
          self.close();
        }
      },
      function () {
        self._retryLater();
      }
    );
  };

  PushStream.prototype._retryLater = function () {
    if (this._closed) return;
    var ceiling = Math.min(this._maxDelay, this._baseDelay * Math.pow(2, this._attempt - 1));
    var delay = ceiling / 2 + Math.random() * ceiling / 2;  // jitter: spread a crowd of reconnects
    var self = this;
    this._timer = setTimeout(function () {
      self._connect();
    }, delay);
  };

  global.PushStream = PushStream;
})(window);

/* The demo page: start contact imports and watch them live. Plain JavaScript, no build step. */
(function () {
  "use strict";

  var page = document.getElementById("page");
  var list = document.getElementById("jobs");
  var notices = document.getElementById("notices");
  var indicator = document.getElementById("connection");
  var form = document.getElementById("start-form");
  var csrfToken = page.dataset.csrfToken;

  function setState(state) {
    indicator.dataset.state = state;
    indicator.textContent = state;
  }

  function notify(kind, text) {
    var item = document.createElement("li");
    item.className = "notice notice-" + kind;
    item.textContent = text;
    notices.insertBefore(item, notices.firstChild);
  }

  function jobRow(id) {
    var row = list.querySelector('[data-job-id="' + id + '"]');
    if (row) return row;
    row = document.createElement("li");
    row.className = "job";
    row.dataset.jobId = id;
    row.innerHTML =
      '<a class="job-title"></a> <progress max="100" value="0"></progress> ' +
      '<span class="job-percent">0%</span> <span class="job-status">queued</span> <span class="job-detail"></span>';
    row.querySelector(".job-title").textContent = "Import #" + id;
    row.querySelector(".job-title").href = "/jobs/" + id + "/watch/";
    list.insertBefore(row, list.firstChild);
    return row;
  }

  function showJob(job) {
    var row = jobRow(job.id);
    if (job.percent !== undefined) {
      row.querySelector("progress").value = job.percent;
      row.querySelector(".job-percent").textContent = job.percent + "%";
    }
    if (job.status) {
      row.dataset.status = job.status;
      row.querySelector(".job-status").textContent = job.status;
    }
    if (job.detail !== undefined) row.querySelector(".job-detail").textContent = job.detail;
  }

  function reloadJobs() {
    fetch("/jobs/", {credentials: "same-origin"})
      .then(function (response) { return response.json(); })
      .then(function (body) {
        body.jobs.slice().reverse().forEach(function (job) {
          showJob({id: job.id, percent: job.percent, status: job.status,
                   detail: job.error || (job.status === "finished" ? job.imported + " imported, " + job.skipped + " skipped" : "")});
        });
      });
  }

  var stream = new PushStream(page.dataset.eventsUrl, {onstate: setState, onreset: reloadJobs});
  page.dataset.transport = stream.transport;
  stream.on("job.progress", function (data) {
    showJob({id: data.job, percent: data.percent, status: "running", detail: data.done + " of " + data.total});
  });
  stream.on("job.finished", function (data) {
    var summary = data.result.imported + " imported, " + data.result.skipped + " skipped";
    showJob({id: data.job, percent: 100, status: "finished", detail: summary});
    notify("success", "Import #" + data.job + " finished: " + summary);
  });
  stream.on("job.failed", function (data) {
    showJob({id: data.job, status: "failed", detail: data.error});
    notify("error", "Import #" + data.job + " failed: " + data.error);
  });

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var button = form.querySelector("button");
    button.disabled = true;
    fetch("/jobs/", {
      method: "POST",
      credentials: "same-origin",
      headers: {"X-CSRFToken": csrfToken},
      body: new FormData(form)
    })
      .then(function (response) {
        return response.json().then(function (body) { return {ok: response.ok, body: body}; });
      })
      .then(function (result) {
        if (result.ok) showJob({id: result.body.id, percent: 0, status: result.body.status});
        else notify("error", result.body.error || "could not start the import");
      })
      .catch(function () { notify("error", "could not reach the server"); })
      .then(function () { button.disabled = false; });
  });
})();

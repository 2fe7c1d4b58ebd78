/* A page watching one job on its own channel: the stream ends for good after the job does. */
(function () {
  "use strict";

  var page = document.getElementById("page");
  var indicator = document.getElementById("connection");
  var bar = document.getElementById("job-progress");
  var status = document.getElementById("job-status");
  var detail = document.getElementById("job-detail");
  var jobId = Number(page.dataset.jobId);

  if (page.dataset.done === "true") {
    indicator.dataset.state = indicator.textContent = "closed";
    return;
  }
  var stream = new PushStream(page.dataset.eventsUrl, {
    onstate: function (state) {
      indicator.dataset.state = state;
      indicator.textContent = state;
    }
  });
  page.dataset.transport = stream.transport;
  stream.on("job.progress", function (data) {
    if (data.job !== jobId) return;
    bar.value = data.percent;
    status.textContent = "running";
    detail.textContent = data.percent + "% (" + data.done + " of " + data.total + ")";
  });
  stream.on("job.finished", function (data) {
    if (data.job !== jobId) return;
    bar.value = 100;
    status.textContent = "finished";
    detail.textContent = data.result.imported + " imported, " + data.result.skipped + " skipped";
  });
  stream.on("job.failed", function (data) {
    if (data.job !== jobId) return;
    status.textContent = "failed";
    detail.textContent = data.error;
  });
})();

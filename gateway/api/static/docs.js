// The API reference page (/docs): Swagger UI, served from the gateway itself (no CDN).
// /openapi.json needs service.read, so the page asks for an API key or session token first; it is
// kept in this tab's sessionStorage only and sent as a Bearer token, also by "Try it out".
(function () {
  "use strict";
  var form = document.getElementById("credentials");
  var input = document.getElementById("token");
  var message = document.getElementById("message");

  function show(token) {
    fetch("/openapi.json", { headers: { Authorization: "Bearer " + token } })
      .then(function (response) {
        if (!response.ok) { throw new Error("the gateway answered " + response.status); }
        return response.json();
      })
      .then(function (spec) {
        sessionStorage.setItem("ecny-docs-token", token);
        form.hidden = true;
        SwaggerUIBundle({
          spec: spec,
          dom_id: "#reference",
          presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
          layout: "BaseLayout",
          requestInterceptor: function (request) {
            request.headers.Authorization = "Bearer " + token;
            return request;
          },
        });
      })
      .catch(function (error) { message.textContent = "Cannot read /openapi.json: " + error.message; });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    show(input.value.trim());
  });
  var kept = sessionStorage.getItem("ecny-docs-token");
  if (kept) { show(kept); }
})();
